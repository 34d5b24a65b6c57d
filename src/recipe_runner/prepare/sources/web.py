"""https:// (and http://) single files, streamed with requests.

The identity is what a HEAD request says (ETag, Content-Length, Last-Modified), so a restarted
pod compares headers instead of downloading again. A body shorter than its Content-Length is a
dropped connection, retried like a 5xx or a 429; 404 and 401/403 are the user's to fix. Every
attempt starts from byte 0: nothing half-written is ever resumed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

from recipe_runner.errors import UserError
from recipe_runner.prepare.sources import Source
from recipe_runner.prepare.transfer import TransientError, progress, with_retries

TIMEOUT = (15, 120)  # (connect, read) seconds
CHUNK = 1 << 20


class HttpSource(Source):
    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri
        if uri.endswith("/"):
            raise UserError(f"{uri}: an https:// source must name a single file (no trailing /)")
        self._headers = {"Accept-Encoding": "identity"}  # byte-exact files, sizes that match
        host = (urlparse(uri).hostname or "").lower()
        token = os.environ.get("HF_TOKEN")
        if token and (host == "huggingface.co" or host.endswith(".huggingface.co")):
            self._headers["Authorization"] = f"Bearer {token}"

    def identity(self) -> dict[str, Any]:
        def head() -> dict[str, Any]:
            try:
                r = requests.head(self.uri, headers=self._headers, timeout=TIMEOUT, allow_redirects=True)
            except (requests.ConnectionError, requests.Timeout) as e:
                raise TransientError(f"HEAD {self.uri}: {e}") from e
            if r.status_code in (405, 501):  # no HEAD support: identity unknown, compare files only
                return {}
            _raise_for_status(r, self.uri)
            size = r.headers.get("Content-Length")
            self.total_size = int(size) if size and size.isdigit() else None
            return {k: r.headers.get(h) for k, h in
                    (("etag", "ETag"), ("size", "Content-Length"), ("last_modified", "Last-Modified")) if r.headers.get(h)}

        return with_retries(head, f"HEAD {self.uri}")

    def download(self, target: Path) -> None:
        with_retries(lambda: self._get(target), f"GET {self.uri}")

    def _get(self, target: Path) -> None:
        try:
            with requests.get(self.uri, headers=self._headers, timeout=TIMEOUT, stream=True) as r:
                _raise_for_status(r, self.uri)
                length = r.headers.get("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                got = 0
                with progress(expected, self.uri) as update, open(target, "wb") as f:
                    for block in r.iter_content(CHUNK):
                        f.write(block)
                        got += len(block)
                        update(len(block))
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            raise TransientError(f"connection lost: {e}") from e
        if expected is not None and got != expected:
            raise TransientError(f"connection closed after {got} of {expected} bytes")


def _raise_for_status(r: requests.Response, uri: str) -> None:
    code = r.status_code
    if code < 400:
        return
    if code == 429 or code >= 500:
        raise TransientError(f"HTTP {code} {r.reason}")
    if code in (404, 410):
        raise UserError(f"{uri}: not found (HTTP {code}); check the URL")
    if code in (401, 403):
        hint = (" For huggingface.co, set HF_TOKEN from a Kubernetes Secret (and accept the model's license)."
                if "huggingface.co" in uri else " Use a URL that needs no credentials (e.g. a presigned URL) or another scheme (s3://, hf://).")
        raise UserError(f"{uri}: access denied (HTTP {code}).{hint}")
    raise UserError(f"{uri}: HTTP {code} {r.reason}")
