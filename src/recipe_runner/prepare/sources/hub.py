"""hf://org/name (a model repo) and hf://datasets/org/name, with huggingface_hub.snapshot_download.

The token is whatever huggingface_hub finds: HF_TOKEN, or the file named by HF_TOKEN_PATH (a
mounted Secret), or the default token file. The requested revision (default `main`) is resolved
to a commit first and that commit is downloaded, so a branch moving during the download cannot
mix two versions; the manifest records both. The identity compared on a restart is the uri and
the requested revision, without asking the hub: a restarted pod keeps the model it started with
and does not need the hub to be reachable.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import errors as hf_errors

from recipe_runner.errors import UserError
from recipe_runner.prepare.sources import Source
from recipe_runner.prepare.transfer import TransientError, check_free_space, human_bytes, with_retries

TOKEN_HELP = ("Set HF_TOKEN in the pod from a Kubernetes Secret (e.g. `kubectl create secret generic hf-token "
              "--from-literal=HF_TOKEN=hf_...`, referenced by the chart), or mount it as a file and set HF_TOKEN_PATH.")


class HubSource(Source):
    is_dir = True

    def __init__(self, uri: str, revision: str | None):
        super().__init__()
        self.uri, self.revision = uri, revision
        parts = [p for p in uri[len("hf://"):].split("/") if p]
        self.repo_type = "model"
        if parts and parts[0] in ("datasets", "models", "spaces"):
            self.repo_type = {"datasets": "dataset", "models": "model", "spaces": "space"}[parts.pop(0)]
        if len(parts) != 2:
            raise UserError(f"{uri}: write hf://org/name for a model or hf://datasets/org/name for a dataset")
        self.repo_id = "/".join(parts)

    def identity(self) -> dict[str, Any]:
        return {"repo_type": self.repo_type, "repo_id": self.repo_id, "revision": self.revision or "main"}

    def download(self, target: Path) -> None:
        token = huggingface_hub.get_token()

        info = self._hub_call(lambda: huggingface_hub.HfApi().repo_info(
            self.repo_id, repo_type=self.repo_type, revision=self.revision, token=token, files_metadata=True), token)
        commit = info.sha
        siblings = getattr(info, "siblings", None) or []
        total = sum(getattr(s, "size", None) or 0 for s in siblings) or None
        check_free_space(target.parent, total)
        print(f"fetch: {self.uri} at {commit}: {len(siblings) or 'unknown number of'} files, {human_bytes(total)}",
              file=sys.stderr, flush=True)
        if not sys.stderr.isatty():  # the hub's tqdm bars redraw with carriage returns: noise in kubectl logs
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        self._hub_call(lambda: huggingface_hub.snapshot_download(
            self.repo_id, repo_type=self.repo_type, revision=commit, local_dir=target, token=token), token)
        shutil.rmtree(target / ".cache", ignore_errors=True)  # the hub's own bookkeeping for local_dir
        self.extra = {"resolved_commit": commit}

    def _hub_call(self, fn: Any, token: str | None) -> Any:
        def attempt() -> Any:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - mapped below, re-raised when unknown
                mapped = self._map_error(e, token)
                if mapped is e:
                    raise
                raise mapped from e

        return with_retries(attempt, f"{self.uri}")

    def _map_error(self, e: Exception, token: str | None) -> Exception:
        """The hub's exceptions, as messages a user can act on (or TransientError to retry)."""
        what = f"{self.uri} ({self.repo_type} {self.repo_id})"
        if isinstance(e, hf_errors.GatedRepoError):
            if token:
                return UserError(f"{what} is gated and the token in use has no access: accept the license on "
                                 f"https://huggingface.co/{self.repo_id} with the token's account, then run again.")
            return UserError(f"{what} is gated: it needs a Hugging Face token whose account accepted its license. {TOKEN_HELP}")
        if isinstance(e, hf_errors.RepositoryNotFoundError):
            hint = "" if token else f" If it is private, a token is needed. {TOKEN_HELP}"
            return UserError(f"{what}: no such repository, or no access to it; check the name.{hint}")
        if isinstance(e, hf_errors.RevisionNotFoundError):
            return UserError(f"{what}: no revision {self.revision!r}; use a branch, tag or commit that exists")
        if isinstance(e, hf_errors.LocalEntryNotFoundError):
            return UserError(f"{what}: the hub cannot be reached (offline mode or no network): {e}. "
                             "Check HF_HUB_OFFLINE and the pod's network, or fetch the model from s3:// instead.")
        if isinstance(e, hf_errors.HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status is not None and (status == 429 or status >= 500):
                return TransientError(f"HTTP {status}")
            if status in (401, 403):
                return UserError(f"{what}: access denied (HTTP {status}). {TOKEN_HELP}")
            return UserError(f"{what}: the hub answered {e}")
        if _is_connection_error(e):
            return TransientError(str(e) or type(e).__name__)
        return e


def _is_connection_error(e: Exception) -> bool:
    """requests (huggingface_hub < 1.0) or httpx (>= 1.0) connection failures, without importing either."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "ConnectError", "Timeout", "TimeoutException", "ReadTimeout",
                         "RemoteProtocolError", "ReadError", "ChunkedEncodingError"})
