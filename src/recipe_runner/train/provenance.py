"""Where a run writes, and what produced it.

provenance.json in every run directory holds enough to trace and re-run a result: the resolved
recipe and its hash, package versions, the recipe repository's git commit (baked into the image
as RECIPE_RUNNER_GIT_COMMIT, else read from git), the manifests fetch, prepare-data and
convert-checkpoint wrote for the recipe's inputs,
seed, device and world size. The resolved recipe itself is saved as recipe.yaml, and the model
config and tokenizer as hf/ so that `export` needs nothing but the run directory.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from recipe_runner.train.distributed import Dist, broadcast_object

PACKAGES = ("recipe-runner", "torch", "transformers", "datasets", "tokenizers", "safetensors", "pydantic",
            "omegaconf", "torch-xla", "torch-neuronx", "neuronx-distributed", "neuronx-cc")


def resolve_run_dir(recipe, d: Dist) -> Path:
    """exp_manager.explicit_log_dir exactly, as in NxDT; otherwise <exp_dir>/<name>/<version>,
    where version is fixed ("run") when resume_if_exists, so a restarted job finds its
    checkpoints, and a timestamp otherwise."""
    em = recipe.exp_manager
    if em.explicit_log_dir:
        path = Path(em.explicit_log_dir)
    else:
        version = "run" if em.resume_if_exists else datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        path = Path(em.exp_dir or "nemo_experiments") / em.name / broadcast_object(version, d)
    path.mkdir(parents=True, exist_ok=True)
    return path


def recipe_hash(resolved: dict) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()


def git_commit(recipe_path: str | None) -> str | None:
    baked = os.environ.get("RECIPE_RUNNER_GIT_COMMIT")
    if baked:
        return baked
    try:
        where = Path(recipe_path).resolve().parent if recipe_path else Path.cwd()
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def source_manifests(recipe) -> dict[str, dict]:
    """The manifests `recipe-runner fetch` wrote beside (file) or inside (dir) each destination."""
    found = {}
    for name, src in recipe.runner.sources.items():
        dest = Path(src.dest)
        for candidate in (dest / ".fetch-manifest.json", dest.with_name(dest.name + ".manifest.json")):
            if candidate.is_file():
                found[name] = json.loads(candidate.read_text())
                break
    return found


def input_manifests(recipe) -> dict[str, dict]:
    """Manifests of what the training reads: prepare-data's (beside the data files) and
    convert-checkpoint's (inside the starting checkpoint)."""
    found = {}
    for key, path in (("train_data", recipe.data.train_dir), ("val_data", recipe.data.val_dir)):
        if path and Path(path + ".manifest.json").is_file():
            found[key] = json.loads(Path(path + ".manifest.json").read_text())
    start = recipe.exp_manager.resume_from_checkpoint
    if start and (Path(start) / ".convert-manifest.json").is_file():
        found["starting_checkpoint"] = json.loads((Path(start) / ".convert-manifest.json").read_text())
    return found


def write_provenance(run_dir: Path, recipe, d: Dist, *, device: str, tokenizer, model_config,
                     start_fingerprint: str, enabled: bool) -> None:
    if not enabled:
        return
    hf = run_dir / "hf"
    hf.mkdir(exist_ok=True)
    model_config.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved, sort_keys=False))
    record = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "recipe_path": recipe.source_path,
        "recipe_sha256": recipe_hash(recipe.resolved),
        "git_commit": git_commit(recipe.source_path),
        "versions": versions(),
        "seed": recipe.seed,
        "device": device,
        "world_size": d.world,
        "host": platform.node(),
        "algorithm": recipe.algorithm,
        "starting_checkpoint": recipe.exp_manager.resume_from_checkpoint,
        "starting_checkpoint_fingerprint": start_fingerprint,
        "train_data": recipe.data.train_dir,
        "val_data": recipe.data.val_dir,
        "source_manifests": source_manifests(recipe),
        "input_manifests": input_manifests(recipe),
    }
    history = run_dir / "provenance.json"
    previous = json.loads(history.read_text()) if history.exists() else {}
    starts = previous.get("starts", []) + [record["time"]]  # a resumed run keeps its history of starts
    tmp = history.with_suffix(".tmp")
    tmp.write_text(json.dumps({**record, "starts": starts}, indent=1, default=str))
    os.replace(tmp, history)
