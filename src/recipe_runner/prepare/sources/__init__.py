"""One class per URI scheme, all with the same small surface, so `fetch` need not know schemes.

A source says whether it is a single file or a directory (`is_dir`), reports its identity
cheaply (`identity()`: ETag/size/Last-Modified, compared with the manifest to skip a download),
its total size when known (`total_size`, for the free-space check), and downloads into a path
that `fetch` chose in the destination's directory (`download(target)`). `extra` is recorded in
the manifest after a download (e.g. the hub commit a branch name resolved to).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from recipe_runner.errors import UserError


class Source(ABC):
    uri: str
    revision: str | None = None
    is_dir: bool = False
    total_size: int | None = None

    def __init__(self) -> None:
        self.extra: dict[str, Any] = {}

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What identifies the source's current content, cheaply (compared with the manifest)."""

    @abstractmethod
    def download(self, target: Path) -> None:
        """Write the content to `target` (a file or a directory, per is_dir)."""


def open_source(uri: str, revision: str | None = None) -> Source:
    """The Source for a URI: s3://, https:// (http://), hf://, file:// or a local path."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if revision and scheme not in ("hf",):
        raise UserError(f"{uri}: `revision` only applies to hf:// sources; remove it")
    if scheme == "s3":
        from recipe_runner.prepare.sources.s3 import S3Source

        return S3Source(uri)
    if scheme in ("http", "https"):
        from recipe_runner.prepare.sources.web import HttpSource

        return HttpSource(uri)
    if scheme == "hf":
        from recipe_runner.prepare.sources.hub import HubSource

        return HubSource(uri, revision)
    if scheme == "file":
        from recipe_runner.prepare.sources.local import LocalSource

        return LocalSource(uri, Path(unquote(parsed.path)))
    if scheme == "" or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):
        from recipe_runner.prepare.sources.local import LocalSource

        return LocalSource(uri, Path(uri))
    raise UserError(f"{uri}: unsupported scheme {scheme!r}; use s3://, https://, hf://, file:// or a local path")
