"""Directory outputs that appear whole or not at all, and re-runs that skip finished work.

A conversion writes into a hidden sibling `.<name>.partial-<pid>`, puts a manifest in it last
(settings, input identity, every file with its size), then renames it to `<name>`. A killed run
leaves only the hidden sibling, which the next run removes; a re-run whose manifest matches (same
settings, same input files by size and mtime, all output files present with their sizes) does
nothing; one with other settings or input replaces an output this command wrote (a directory
it did not write needs --overwrite). A file lock beside the output serialises runs that share a
filesystem (several pods).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from recipe_runner.errors import UserError

MANIFEST = ".convert-manifest.json"
FORMAT = "recipe-runner-convert/1"


def input_identity(paths: list[Path]) -> list[dict]:
    """Cheap identity of the input files: resolved path, size, mtime (no hashing of 16 GB)."""
    out = []
    for p in sorted({Path(p).resolve() for p in paths}):
        st = p.stat()
        out.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(out: Path, settings: dict, identity: list[dict]) -> bool:
    m = read_manifest(out)
    if not m or m.get("format") != FORMAT or m.get("settings") != settings or m.get("input") != identity:
        return False
    for f in m.get("files", []):
        p = out / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"]:
            return False
    return True


class Staging:
    """The directory a conversion writes into; `extra` adds keys to the manifest (e.g. the HF config)."""

    def __init__(self, path: Path):
        self.path = path
        self.extra: dict = {}


@contextmanager
def staged_output(out: str | Path, settings: dict, identity: list[dict], overwrite: bool = False) -> Iterator[Staging | None]:
    """Yield a Staging to fill, or None when `out` already holds this exact conversion."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        for stale in out.parent.glob(f".{out.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run; we hold the lock
        if out.exists():
            if is_up_to_date(out, settings, identity):
                yield None
                return
            if not out.is_dir():
                raise UserError(f"output {out} exists and is not a directory: choose another output path")
            if any(out.iterdir()) and read_manifest(out) is None and not overwrite:
                raise UserError(f"output {out} exists and was not written by convert-checkpoint: "
                                "remove it, choose another output, or pass --overwrite")
        staging = Staging(out.parent / f".{out.name}.partial-{os.getpid()}")
        staging.path.mkdir()
        try:
            yield staging
            files = sorted(p for p in staging.path.rglob("*") if p.is_file())
            manifest = {"format": FORMAT, "settings": settings, "input": identity, **staging.extra,
                        "files": [{"path": p.relative_to(staging.path).as_posix(), "size": p.stat().st_size} for p in files]}
            (staging.path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            _swap_in(staging.path, out)
        except BaseException:
            shutil.rmtree(staging.path, ignore_errors=True)
            raise


def _swap_in(staging: Path, out: Path) -> None:
    try:
        if out.exists():
            trash = out.parent / f".{out.name}.partial-old-{os.getpid()}"
            os.rename(out, trash)
            os.rename(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, out)
    except OSError as e:
        raise UserError(f"cannot put the converted checkpoint at {out}: {e}. If {out} is a mount point, "
                        "write to a directory inside it") from e
