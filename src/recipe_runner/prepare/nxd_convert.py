"""HF <-> NxD checkpoint conversion, streamed: one output file (or one layer) in memory at a time.

`hf_to_nxd` builds each `dp_rank_00_tp_rank_XX_pp_rank_YY.pt` from slices read out of the HF
files; `nxd_to_hf` rebuilds the HF tensors one layer at a time from the rank files and writes a
directory that `from_pretrained` loads (config.json, safetensors shards, tokenizer files);
`load_nxd_as_hf_state_dict` does the same into memory for the trainer. Which slice goes where is
decided in `nxd_layout` alone. Settings the files can tell (tp/pp from file names, fuse_qkv and
qkv_linear from tensor names, kv_size_multiplier from the k shape) are detected when not given,
and checked when given.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch

from recipe_runner.errors import UserError
from recipe_runner.prepare import hf_io, nxd_io
from recipe_runner.prepare.nxd_layout import (LlamaDims, NxdTensor, Parallel, check_geometry, hf_param_shapes, llama_dims,
                                              nxd_tensor_shape, rank_layout)
from recipe_runner.prepare.staged_dir import input_identity, read_manifest, staged_output

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
Log = Callable[[str], None]


def _config(hf_config, *fallback_dirs: Path) -> tuple[dict, list[Path]]:
    """The HF config as a dict, and the file it came from (part of the input identity)."""
    if hf_config is None:
        for d in fallback_dirs:
            if (d / "config.json").is_file():
                return hf_io.load_hf_config(d / "config.json"), [d / "config.json"]
            m = read_manifest(d) if d.is_dir() else None
            if m and m.get("hf_config"):
                return m["hf_config"], []
        raise UserError(f"no config.json next to the input ({', '.join(map(str, fallback_dirs))}): pass --config")
    if isinstance(hf_config, (str, Path)):
        return hf_io.load_hf_config(hf_config), [Path(hf_config)]
    return (hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)), []


def _gather(src: hf_io.HfSource, t: NxdTensor) -> torch.Tensor:
    parts = src.read([(pc.hf_name, t.dim, pc.start, pc.stop) for pc in t.pieces])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=t.dim)


def _check_hf_shapes(src: hf_io.HfSource, d: LlamaDims) -> None:
    for name, shape in hf_param_shapes(d).items():
        if name not in src.shapes:
            raise UserError(f"{src.path} has no tensor {name}: is it a Llama checkpoint matching the config "
                            f"({d.layers} layers)?")
        if src.shapes[name] != shape:
            raise UserError(f"{src.path}: {name} has shape {list(src.shapes[name])}, the config says {list(shape)}: "
                            "pass the config.json that belongs to this checkpoint")


def hf_to_nxd(*, input: str | Path, output: str | Path, hf_config=None, tp_size: int, pp_size: int = 1,
              kv_size_multiplier: int = 1, qkv_linear: bool = True, fuse_qkv: bool = False, save_xser: bool = True,
              overwrite: bool = False, log: Log = print) -> Path:
    """Write `<output>/model/dp_rank_00_tp_rank_XX_pp_rank_YY.pt` for every rank; returns output."""
    input, output = Path(input), Path(output)
    cfg, cfg_files = _config(hf_config, input if input.is_dir() else input.parent)
    d, p = llama_dims(cfg), Parallel(tp_size, pp_size, kv_size_multiplier, qkv_linear, fuse_qkv)
    check_geometry(d, p)
    src = hf_io.HfSource(input)
    _check_hf_shapes(src, d)
    settings = {"direction": "hf->nxd", **vars(p), "save_xser": save_xser}
    with staged_output(output, settings, input_identity(src.files + cfg_files), overwrite) as staging:
        if staging is None:
            log(f"{output} is up to date (same input and settings); nothing to do")
            return output
        staging.extra["hf_config"] = cfg
        staging.extra["hf_input"] = str((input if input.is_dir() else input.parent).resolve())  # tokenizer files for the way back
        model_dir = staging.path / "model"
        model_dir.mkdir()
        for pp in range(pp_size):
            for tp in range(tp_size):
                state = {t.name: _gather(src, t) for t in rank_layout(d, p, tp, pp)}
                nxd_io.write_rank_file(nxd_io.rank_file(model_dir, tp, pp), state, save_xser)
                del state
                log(f"wrote tp_rank {tp:02d} pp_rank {pp:02d}")
    log(f"NxD checkpoint (tp={tp_size}, pp={pp_size}, kv_size_multiplier={kv_size_multiplier}) in {output}")
    return output


def detect_parallel(files: dict[tuple[int, int], Path], d: LlamaDims, tp_size: int | None = None, pp_size: int | None = None,
                    kv_size_multiplier: int | None = None, qkv_linear: bool | None = None, fuse_qkv: bool | None = None) -> Parallel:
    """Settings read from the files; any that is given must agree, else a UserError says which."""
    found_tp = 1 + max(t for t, _ in files)
    found_pp = 1 + max(p for _, p in files)
    names = nxd_io.load_rank_file(files[(0, 0)])
    a = "model.layers.0.self_attn."
    if a + "qkv_proj.weight_qkv" in names:
        lin, fuse = True, True
    elif a + "qkv_proj.weight_q" in names:
        lin, fuse = True, False
    elif a + "qkv_proj.weight" in names:
        lin, fuse = False, True
    elif a + "q_proj.weight" in names:
        lin, fuse = False, False
    else:
        raise UserError(f"{files[(0, 0)]} has no attention weights for layer 0 (found {sorted(names)[:5]} ...): "
                        "not an NxD Llama checkpoint")
    mult = 1
    if lin:
        if fuse:
            kv_rows = (names[a + "qkv_proj.weight_qkv"].shape[0] - d.heads * d.head_dim // found_tp) // 2
        else:
            kv_rows = names[a + "qkv_proj.weight_k"].shape[0]
        mult = kv_rows * found_tp // (d.kv_heads * d.head_dim)
    del names
    found = {"tp_size": found_tp, "pp_size": found_pp, "kv_size_multiplier": mult, "qkv_linear": lin, "fuse_qkv": fuse}
    given = {"tp_size": tp_size, "pp_size": pp_size, "kv_size_multiplier": kv_size_multiplier, "qkv_linear": qkv_linear,
             "fuse_qkv": fuse_qkv}
    for key, value in given.items():
        if value is not None and value != found[key]:
            raise UserError(f"{key}={value} was given, but the checkpoint under {files[(0, 0)].parent} was written with "
                            f"{key}={found[key]}: drop the option or fix it")
    p = Parallel(**found)
    check_geometry(d, p)
    return p


def _layer_groups(d: LlamaDims) -> list[list[str]]:
    """HF names in write order, grouped so that one group is one read pass over the rank files."""
    names = list(hf_param_shapes(d))
    groups: dict[str, list[str]] = {}
    for n in names:
        m = re.match(r"model\.layers\.(\d+)\.", n)
        key = m.group(1) if m else ("embed" if "embed_tokens" in n else "final")
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def iter_hf_tensors(nxd_dir: str | Path, hf_config, *, tp_size: int | None = None, pp_size: int | None = None,
                    kv_size_multiplier: int | None = None, qkv_linear: bool | None = None, fuse_qkv: bool | None = None):
    """Yield (hf_name, tensor) in checkpoint order, holding about one layer in memory at a time."""
    files = nxd_io.find_rank_files(nxd_dir)
    cfg, _ = _config(hf_config, Path(nxd_dir))
    d = llama_dims(cfg)
    p = detect_parallel(files, d, tp_size, pp_size, kv_size_multiplier, qkv_linear, fuse_qkv)
    hf_shapes = hf_param_shapes(d)
    # hf_name -> [(tp, pp, NxdTensor, offset of the piece inside it, piece)]
    sources: dict[str, list] = {}
    for pp in range(p.pp_size):
        for tp in range(p.tp_size):
            for t in rank_layout(d, p, tp, pp):
                if d.tied and t.name == "lm_head.weight":
                    continue  # a copy of the embedding
                offset = 0
                for pc in t.pieces:
                    sources.setdefault(pc.hf_name, []).append((tp, pp, t, offset, pc))
                    offset += pc.length
    for group in _layer_groups(d):
        out: dict[str, torch.Tensor] = {}
        filled: set[tuple[str, int, int]] = set()
        need = sorted({(pp, tp) for n in group for tp, pp, *_ in sources[n]})
        for pp, tp in need:
            state = nxd_io.load_rank_file(files[(tp, pp)])
            for n in group:
                for s_tp, s_pp, t, offset, pc in sources[n]:
                    if (s_tp, s_pp) != (tp, pp) or (n, pc.start, pc.stop) in filled:
                        continue  # other rank, or a kv replica already taken from a lower rank
                    if t.name not in state:
                        raise UserError(f"{files[(tp, pp)]} lacks {t.name}: is this checkpoint a Llama with this config?")
                    x = state[t.name]
                    want = nxd_tensor_shape(t, hf_shapes)
                    if tuple(x.shape) != want:
                        raise UserError(f"{files[(tp, pp)]}: {t.name} has shape {list(x.shape)}, expected {list(want)} for "
                                        f"tp={p.tp_size}, kv_size_multiplier={p.kv_size_multiplier}: wrong config or settings")
                    if n not in out:
                        out[n] = torch.empty(hf_shapes[n], dtype=x.dtype)
                    out[n].narrow(t.dim, pc.start, pc.length).copy_(x.narrow(t.dim, offset, pc.length))
                    filled.add((n, pc.start, pc.stop))
            del state
        for n in group:
            yield n, out.pop(n)


def load_nxd_as_hf_state_dict(nxd_dir: str | Path, hf_config=None, *, tp_size: int | None = None, pp_size: int | None = None,
                              kv_size_multiplier: int | None = None, qkv_linear: bool | None = None,
                              fuse_qkv: bool | None = None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole NxD checkpoint as a HF-named state dict (lm_head shares the embedding when tied)."""
    sd = {n: (t if dtype is None else t.to(dtype)) for n, t in iter_hf_tensors(
        nxd_dir, hf_config, tp_size=tp_size, pp_size=pp_size, kv_size_multiplier=kv_size_multiplier,
        qkv_linear=qkv_linear, fuse_qkv=fuse_qkv)}
    cfg, _ = _config(hf_config, Path(nxd_dir))
    if llama_dims(cfg).tied:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9, '500MiB' -> 500*2**20, 1000 -> 1000 (the units save_pretrained's max_shard_size takes)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"max shard size {text!r} is not a size: write e.g. 2GB, 500MB or 5GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def nxd_to_hf(*, input: str | Path, output: str | Path, hf_config=None, tp_size: int | None = None, pp_size: int | None = None,
              kv_size_multiplier: int | None = None, qkv_linear: bool | None = None, fuse_qkv: bool | None = None,
              dtype: str | None = None, max_shard_size: str | int = "2GB", tokenizer_dir: str | Path | None = None,
              overwrite: bool = False, log: Log = print) -> Path:
    """Write a complete HF model directory (config.json, safetensors, tokenizer files) from an NxD checkpoint."""
    input, output = Path(input), Path(output)
    files = nxd_io.find_rank_files(input)
    cfg, cfg_files = _config(hf_config, input)
    d = llama_dims(cfg)
    p = detect_parallel(files, d, tp_size, pp_size, kv_size_multiplier, qkv_linear, fuse_qkv)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    hf_input = (read_manifest(input) or {}).get("hf_input")
    tok_dirs = [Path(tokenizer_dir)] if tokenizer_dir else [input, input.parent, *([Path(hf_input)] if hf_input else [])]
    weight_files = [f for rf in files.values() for f in (rf, *Path(str(rf) + ".tensors").glob("*.pt"))]
    settings = {"direction": "nxd->hf", **vars(p), "dtype": dtype, "max_shard_bytes": max_bytes,
                "tokenizer_dir": str(tokenizer_dir) if tokenizer_dir else None}
    with staged_output(output, settings, input_identity(weight_files + cfg_files), overwrite) as staging:
        if staging is None:
            log(f"{output} is up to date (same input and settings); nothing to do")
            return output
        writer = hf_io.HfShardWriter(staging.path, max_bytes)
        for name, t in iter_hf_tensors(input, cfg, **vars(p)):
            writer.add(name, t if dtype is None else t.to(DTYPES[dtype]))
        writer.finish()
        out_cfg = dict(cfg)
        out_cfg.setdefault("architectures", ["LlamaForCausalLM"])
        out_cfg.setdefault("model_type", "llama")
        if dtype is not None:
            out_cfg["torch_dtype"] = dtype
            if "dtype" in out_cfg:
                out_cfg["dtype"] = dtype
        (staging.path / "config.json").write_text(json.dumps(out_cfg, indent=2, sort_keys=True) + "\n")
        copied = hf_io.copy_tokenizer_files(tok_dirs, staging.path)
        if not copied:
            log(f"no tokenizer files found in {', '.join(map(str, tok_dirs))}: the HF directory has weights and config only")
    log(f"Hugging Face model directory in {output}")
    return output
