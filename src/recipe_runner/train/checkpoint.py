"""Checkpoints: atomic saves, save_top_k pruning, finding the newest complete one.

A checkpoint is a directory `<run_dir>/checkpoints/<filename>/` with model.safetensors (Hugging
Face parameter names), optimizer.pt, scheduler.pt and trainer_state.json. It is written under a
temporary name and renamed into place as the last step, so a save killed half-way leaves only a
`.tmp-*` directory that is never mistaken for a checkpoint (and is cleaned on the next save);
the newest complete checkpoint is never touched until a newer one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

STATE_FILE = "trainer_state.json"


def checkpoint_name(template: str, *, name: str, step: int, consumed_samples: int) -> str:
    """NeMo/PTL formatting of checkpoint_callback_params.filename: `{step}` -> `step=10`."""
    out = template.replace("{name}", name)
    for key, value in (("step", step), ("consumed_samples", consumed_samples)):
        out = out.replace("{" + key + "}", f"{key}={value}")
    return re.sub(r"[^\w.=+-]", "_", out)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first, as (step, path)."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and not d.name.startswith(".tmp-") and (d / STATE_FILE).is_file():
                found.append((json.loads((d / STATE_FILE).read_text())["step"], d))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | Path, name: str, *, model, optimizer, scheduler, state: dict,
                    save_top_k: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / name
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # written last: marks completeness
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # same step saved again (a re-run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(run_dir, save_top_k)
    return final


def prune(run_dir: str | Path, save_top_k: int) -> None:
    """Keep the `save_top_k` newest (monitor: step, mode: max); -1 keeps all."""
    if save_top_k < 0:
        return
    found = list_checkpoints(run_dir)
    for _, path in found[: max(0, len(found) - max(save_top_k, 1))]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, *, model, optimizer=None, scheduler=None) -> dict:
    """Restore weights (and optimizer/scheduler/RNG when given); returns trainer_state."""
    load_model(model, str(path / "model.safetensors"), strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    return json.loads((path / STATE_FILE).read_text())
