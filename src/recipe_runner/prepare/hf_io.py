"""Streaming access to Hugging Face checkpoints: read slices, write shards.

Reading never loads a whole model: safetensors files are opened with `safe_open` for each group
of slices and closed again (its memory map goes with it, so touched pages do not pile up in the
process's memory), and `.bin`/`.pt` files are memory-mapped by `torch.load(mmap=True)` per read.
Writing keeps one output shard in memory at a time and names the shards the way
`save_pretrained` does (`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recipe_runner.errors import UserError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a HF directory (index json, single file) or a single weight file."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"input {path} does not exist: point --input at a Hugging Face model directory")
    for index in (SAFE_INDEX, BIN_INDEX):
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise UserError(f"{path / index} is not a valid index (needs a weight_map): {e}") from e
            files = [path / f for f in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{path / index} lists {missing[0]}, which is missing: the download is incomplete")
            return files
    for single in ("model.safetensors", "pytorch_model.bin", "checkpoint.pt"):
        if (path / single).is_file():
            return [path / single]
    raise UserError(f"no weights in {path}: expected model.safetensors, {SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX}")


def _torch_load(f: Path):
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be mapped
        obj = torch.load(f, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj


class HfSource:
    """name -> shape of a HF checkpoint, and slice reads that keep memory near the slice size."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files = _weight_files(self.path)
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self.where[k], self.shapes[k] = f, tuple(h.get_slice(k).get_shape())
            else:
                for k, v in _torch_load(f).items():
                    if isinstance(v, torch.Tensor):
                        self.where[k], self.shapes[k] = f, tuple(v.shape)

    def read(self, requests: list[tuple[str, int, int, int]]) -> list[torch.Tensor]:
        """[(name, dim, start, stop)] -> copies of name.narrow(dim, start, stop - start), in order."""
        out: list[torch.Tensor | None] = [None] * len(requests)
        by_file: dict[Path, list[int]] = {}
        for i, (name, *_rest) in enumerate(requests):
            by_file.setdefault(self.where[name], []).append(i)
        for f, idx in by_file.items():
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as h:
                    for i in idx:
                        name, dim, a, b = requests[i]
                        sl = h.get_slice(name)
                        t = sl[a:b] if dim == 0 else sl[:, a:b]
                        # safetensors may hand out views of its (private, file-backed) memory map; a copy
                        # lets the map, and every page a column slice touched, go when the file closes
                        out[i] = t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
            else:
                state = _torch_load(f)
                for i in idx:
                    name, dim, a, b = requests[i]
                    out[i] = state[name].narrow(dim, a, b - a).clone()
                del state
        return out  # type: ignore[return-value]


class HfShardWriter:
    """Collects tensors into safetensors shards of at most max_shard_bytes, written as they fill."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f"model-{len(self.shards) + 1:05d}.partial.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, give the shards their final names (+ index when several)."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            final = self.out_dir / "model.safetensors"
            self.shards[0][0].rename(final)
            return [final]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self.shards, 1):
            final = self.out_dir / f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            files.append(final)
            weight_map.update({k: final.name for k in names})
        index = self.out_dir / SAFE_INDEX
        index.write_text(json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2) + "\n")
        return [*files, index]


def load_hf_config(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"model config {path} not found: pass --config pointing at the model's config.json")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"model config {path} is not valid JSON: {e}") from e


def copy_tokenizer_files(src_dirs: list[Path], dst: Path) -> list[Path]:
    """Copy tokenizer/generation files found in the first of src_dirs that has any."""
    for src in src_dirs:
        found = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
        if found:
            for f in found:
                shutil.copy2(f, dst / f.name)
            return [dst / f.name for f in found]
    return []
