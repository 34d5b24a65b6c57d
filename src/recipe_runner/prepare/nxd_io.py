"""NxD rank files on disk: `model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt`, plain or xser.

Plain: one `torch.save` of the rank's state dict. xser (torch_xla.utils.serialization, as NxD's
trainer writes it): the file holds the state dict with every tensor replaced by a
`torch_xla.utils.serialization.TensorReference(tid)`, the tensors live in
`<file>.tensors/tensor_<tid>.pt`, and `<file>.info.pt` maps tid -> {dtype, shape,
expert_model_parallel} (NxD's broadcast loader reads it). torch_xla is not needed here: a local
stand-in class is pickled under torch_xla's name, and read back under `weights_only=True` by
allow-listing that one name.
"""

from __future__ import annotations

import os
import pickle
import re
import types
from collections.abc import Mapping
from pathlib import Path

import torch

from recipe_runner.errors import UserError

RANK_FILE = "dp_rank_00_tp_rank_{tp:02d}_pp_rank_{pp:02d}.pt"
_RANK_RE = re.compile(r"^dp_rank_00_tp_rank_(\d+)_pp_rank_(\d+)\.pt$")
XSER_REF_NAME = "torch_xla.utils.serialization.TensorReference"


class XserTensorReference:
    """Stand-in for torch_xla's TensorReference: same pickled name, same `tid` attribute."""

    def __init__(self, tid: int):
        self.tid = tid


class _XserPickler(pickle._Pickler):  # the pure-Python pickler lets us name the class ourselves
    def save_global(self, obj, name=None):
        if obj is XserTensorReference:
            module, _, cls = XSER_REF_NAME.rpartition(".")
            self.write(pickle.GLOBAL + f"{module}\n{cls}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


_XSER_PICKLE = types.ModuleType("recipe_runner_xser_pickle")
_XSER_PICKLE.Pickler = _XserPickler  # type: ignore[attr-defined]


def rank_file(model_dir: str | Path, tp: int, pp: int) -> Path:
    return Path(model_dir) / RANK_FILE.format(tp=tp, pp=pp)


def compact(t: torch.Tensor) -> torch.Tensor:
    """A tensor that owns exactly its bytes: torch.save of a view would write the whole base storage."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def write_rank_file(path: str | Path, state: dict[str, torch.Tensor], xser: bool) -> list[Path]:
    """Write one rank's state dict; returns every file written (for the output manifest)."""
    path = Path(path)
    if not xser:
        torch.save({k: compact(v) for k, v in state.items()}, path)
        return [path]
    folder = Path(str(path) + ".tensors")
    folder.mkdir(parents=True, exist_ok=True)
    refs, info, written = {}, {}, []
    for tid, (name, t) in enumerate(state.items()):
        f = folder / f"tensor_{tid}.pt"
        torch.save(compact(t), f)
        written.append(f)
        refs[name] = XserTensorReference(tid)
        info[tid] = {"dtype": t.dtype, "shape": t.shape, "expert_model_parallel": False}
    torch.save(refs, path, pickle_module=_XSER_PICKLE)
    torch.save(info, str(path) + ".info.pt")
    return [path, Path(str(path) + ".info.pt"), *written]


def _load(path: Path):
    """torch.load, memory-mapped when the file allows it, so only touched bytes are read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)


class _XserTensors(Mapping):
    """name -> tensor of an xser rank file, each `tensor_<tid>.pt` read only when asked for."""

    def __init__(self, path: Path, refs: dict):
        self.path, self.refs = path, refs

    def __getitem__(self, name: str) -> torch.Tensor:
        v = self.refs[name]
        if not isinstance(v, XserTensorReference):
            return v  # tensors kept inline (torch_xla's xser.save of CPU tensors does this)
        f = Path(str(self.path) + ".tensors") / f"tensor_{v.tid}.pt"
        if not f.is_file():
            raise UserError(f"xser checkpoint {self.path} refers to {f}, which is missing: the checkpoint is incomplete")
        return _load(f)

    def __iter__(self):
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)


def load_rank_file(path: str | Path) -> Mapping[str, torch.Tensor]:
    """name -> tensor of one rank file (plain or xser, detected from `<file>.tensors`), read lazily."""
    path = Path(path)
    xser = Path(str(path) + ".tensors").is_dir()
    try:
        if xser:
            with torch.serialization.safe_globals([(XserTensorReference, XSER_REF_NAME)]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = _load(path)
    except (OSError, pickle.UnpicklingError, RuntimeError) as e:
        raise UserError(f"cannot read NxD checkpoint file {path}: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # trainer checkpoints may wrap the model state dict
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    obj = {k: v for k, v in obj.items() if isinstance(v, (torch.Tensor, XserTensorReference))}
    return _XserTensors(path, obj) if xser else obj


def find_rank_files(nxd_dir: str | Path) -> dict[tuple[int, int], Path]:
    """{(tp, pp): path} of the rank files under `<nxd_dir>/model` (or `nxd_dir` itself)."""
    nxd_dir = Path(nxd_dir)
    model_dir = nxd_dir / "model" if (nxd_dir / "model").is_dir() else nxd_dir
    found = {}
    if model_dir.is_dir():
        for name in os.listdir(model_dir):
            m = _RANK_RE.match(name)
            if m:
                found[(int(m.group(1)), int(m.group(2)))] = model_dir / name
    if not found:
        raise UserError(f"no NxD rank files (model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt) under {nxd_dir}: "
                        "point --input at the directory that holds model/")
    tp_size = 1 + max(t for t, _ in found)
    pp_size = 1 + max(p for _, p in found)
    missing = [RANK_FILE.format(tp=t, pp=p) for p in range(pp_size) for t in range(tp_size) if (t, p) not in found]
    if missing:
        raise UserError(f"NxD checkpoint {model_dir} is incomplete: missing {', '.join(missing[:4])}"
                        f"{' ...' if len(missing) > 4 else ''}")
    return found
