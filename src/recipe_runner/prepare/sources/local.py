"""Local paths and file:// URIs: a copy, with the same manifest as a download.

Useful for data already on a shared volume and for tests; the identity is each file's size and
modification time, so editing the source makes the next fetch copy it again.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from recipe_runner.errors import UserError
from recipe_runner.prepare.manifest import list_files
from recipe_runner.prepare.sources import Source
from recipe_runner.prepare.transfer import progress


class LocalSource(Source):
    def __init__(self, uri: str, path: Path):
        super().__init__()
        self.uri, self.path = uri, path.expanduser()
        if not self.path.exists():
            raise UserError(f"{uri}: no such file or directory")
        self.is_dir = self.path.is_dir()
        self._files = list_files(self.path) if self.is_dir else [Path(self.path.name)]
        root = self.path if self.is_dir else self.path.parent
        self._stats = [(p, (root / p).stat()) for p in self._files]
        self.total_size = sum(st.st_size for _p, st in self._stats)

    def identity(self) -> dict[str, Any]:
        return {"files": {p.as_posix(): [st.st_size, st.st_mtime_ns] for p, st in self._stats}}

    def download(self, target: Path) -> None:
        if not self.is_dir:
            _copy(self.path, target, self.uri)
            return
        target.mkdir(parents=True, exist_ok=True)
        for rel in self._files:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            _copy(self.path / rel, target / rel, f"{self.uri}/{rel.as_posix()}")


def _copy(src: Path, dst: Path, desc: str) -> None:
    with progress(src.stat().st_size, desc) as update, open(src, "rb") as fin, open(dst, "wb") as fout:
        for block in iter(lambda: fin.read(1 << 20), b""):
            fout.write(block)
            update(len(block))
    shutil.copystat(src, dst)
