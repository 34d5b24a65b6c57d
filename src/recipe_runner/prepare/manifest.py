"""Manifests: the record that a destination holds a complete copy of a source.

A manifest is written last, after every file is in place, so its presence means "complete". It
names the source (uri, revision, and the source's identity: ETag/size/Last-Modified for s3 and
https, the resolved commit for the hub) and each file with its size and sha256. A restarted pod
compares the source's identity and the files' sizes with it and skips the download.

Where: a directory destination keeps it inside (`<dest>/.fetch-manifest.json`, so it moves with
the directory); a file destination keeps it beside (`<dest>.manifest.json`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from recipe_runner.files import sha256_file
from recipe_runner.prepare.transfer import atomic_write_text

FORMAT = "recipe-runner-fetch/1"
DIR_MANIFEST = ".fetch-manifest.json"


def manifest_path(dest: Path, is_dir: bool) -> Path:
    return dest / DIR_MANIFEST if is_dir else dest.with_name(dest.name + ".manifest.json")


def list_files(root: Path) -> list[Path]:
    """Regular files under a directory, relative, sorted; the manifest itself excluded."""
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root)
            if rel.as_posix() != DIR_MANIFEST:
                out.append(rel)
    return sorted(out)


def describe_files(root: Path, rel_paths: list[Path]) -> list[dict[str, Any]]:
    return [{"path": p.as_posix(), "size": (root / p).stat().st_size, "sha256": sha256_file(root / p)} for p in rel_paths]


def read_manifest(path: Path, fmt: str = FORMAT) -> dict[str, Any] | None:
    """The manifest of format `fmt`, or None when absent, unreadable or another format (each
    means: do the work again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == fmt else None


def write_manifest(path: Path, uri: str, revision: str | None, identity: dict[str, Any],
                   files: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    data = {
        "format": FORMAT,
        "uri": uri,
        "revision": revision,
        "identity": identity,
        "files": files,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fetched_by": socket.gethostname(),
        **(extra or {}),
    }
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def why_stale(manifest: dict[str, Any] | None, uri: str, revision: str | None, identity: dict[str, Any],
              dest: Path, is_dir: bool, sha256: str | None, verify: bool) -> str | None:
    """None when `dest` is an up-to-date copy of the source; otherwise the reason to fetch again."""
    if manifest is None:
        return "no manifest"
    if manifest.get("uri") != uri or manifest.get("revision") != revision:
        return "the manifest is for another source"
    if manifest.get("identity") != identity:
        return "the source changed (ETag/size/date differ)"
    files = manifest.get("files") or []
    if not files:
        return "the manifest lists no files"
    if sha256 and (is_dir or files[0].get("sha256") != sha256.lower()):
        return "the expected sha256 differs from the recorded one"
    for rec in files:
        path = dest / rec["path"] if is_dir else dest
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if size != rec.get("size"):
            return f"{path} has {size} bytes, the manifest says {rec.get('size')}"
        if verify and sha256_file(path) != rec.get("sha256"):
            return f"{path} does not match its recorded sha256"
    return None
