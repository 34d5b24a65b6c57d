"""fetch from hf:// (hub mocked), local paths, the recipe form, and a disk that fills up.

The Hugging Face Hub cannot be reached from this machine, so the hub tests replace
huggingface_hub's network calls: `HfApi.repo_info` and `snapshot_download` (patched to copy a
local directory), and raise the hub's own exception classes for gated and missing repos.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import errors as hf_errors

from recipe_runner import cli
from recipe_runner.errors import UserError
from recipe_runner.prepare import transfer
from recipe_runner.prepare.fetch import fetch
from recipe_runner.prepare.sources import local as local_source

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(transfer, "BASE_DELAY_S", 0.01)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A hub whose one repo is a local directory; records the calls."""
    repo = tmp_path / "hub-repo"
    (repo / "sub").mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "llama"}')
    (repo / "sub" / "tokenizer.json").write_text("{}")
    calls = []

    def repo_info(self, repo_id, repo_type=None, revision=None, token=None, **_):
        calls.append(("repo_info", repo_id, repo_type, revision, token))
        return SimpleNamespace(sha=COMMIT, siblings=[SimpleNamespace(rfilename="config.json", size=23),
                                                     SimpleNamespace(rfilename="sub/tokenizer.json", size=2)])

    def snapshot_download(repo_id, repo_type=None, revision=None, local_dir=None, token=None, **_):
        import shutil

        calls.append(("snapshot_download", repo_id, repo_type, revision, token))
        shutil.copytree(repo, local_dir, dirs_exist_ok=True)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)  # the hub's bookkeeping
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def _hub_error(cls, status: int):
    """The hub's own exception class, built without its HTTP library (httpx or requests by version)."""
    e = cls.__new__(cls)
    Exception.__init__(e, f"{status} Client Error")
    e.response = SimpleNamespace(status_code=status, headers={})
    return e


def test_hub_model_downloads_pinned_commit_and_skips_on_restart(fake_hub, tmp_path, capsys):
    dest = tmp_path / "models" / "llama"
    assert fetch("hf://meta-llama/Meta-Llama-3-8B", dest) is True
    assert f"at {COMMIT}: 2 files, 25 B" in capsys.readouterr().err
    assert fake_hub[0] == ("repo_info", "meta-llama/Meta-Llama-3-8B", "model", None, None)
    assert fake_hub[1][3] == COMMIT  # the branch was resolved first, the commit downloaded
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        ".fetch-manifest.json", "config.json", "sub/tokenizer.json"]
    manifest = json.loads((dest / ".fetch-manifest.json").read_text())
    assert manifest["resolved_commit"] == COMMIT and manifest["identity"]["revision"] == "main"
    assert fetch("hf://meta-llama/Meta-Llama-3-8B", dest) is False
    assert len(fake_hub) == 2  # the restart asked the hub nothing


def test_hub_dataset_with_revision_and_token(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    fetch("hf://datasets/Intel/orca_dpo_pairs", tmp_path / "orca", revision="v1")
    assert fake_hub[0] == ("repo_info", "Intel/orca_dpo_pairs", "dataset", "v1", "hf_test_token")
    assert fake_hub[1] == ("snapshot_download", "Intel/orca_dpo_pairs", "dataset", COMMIT, "hf_test_token")


@pytest.mark.parametrize("token, error, message", [
    (None, "gated", "is gated: it needs a Hugging Face token .* Set HF_TOKEN in the pod from a Kubernetes Secret"),
    ("hf_x", "gated", "is gated and the token in use has no access: accept the license"),
    (None, "missing", "no such repository, or no access to it; .*If it is private, a token is needed"),
    (None, "revision", "no revision 'nope'"),
    (None, "denied", r"access denied \(HTTP 403\)"),
])
def test_hub_errors_become_user_errors(monkeypatch, tmp_path, token, error, message):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    exc = {"gated": _hub_error(hf_errors.GatedRepoError, 401), "missing": _hub_error(hf_errors.RepositoryNotFoundError, 404),
           "revision": _hub_error(hf_errors.RevisionNotFoundError, 404), "denied": _hub_error(hf_errors.HfHubHTTPError, 403)}[error]

    def repo_info(*_a, **_k):
        raise exc

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    with pytest.raises(UserError, match=message):
        fetch("hf://meta-llama/Meta-Llama-3-8B", tmp_path / "m", revision="nope" if error == "revision" else None)
    assert not (tmp_path / "m").exists()


def test_hub_5xx_is_retried(fake_hub, monkeypatch, tmp_path, capsys):
    real = huggingface_hub.snapshot_download
    failures = [_hub_error(hf_errors.HfHubHTTPError, 502)]

    def flaky(*a, **k):
        if failures:
            raise failures.pop()
        return real(*a, **k)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", flaky)
    assert fetch("hf://org/model", tmp_path / "m") is True
    assert "attempt 1/5 failed (HTTP 502)" in capsys.readouterr().err


def test_bad_hub_uri(tmp_path):
    with pytest.raises(UserError, match="write hf://org/name"):
        fetch("hf://just-a-name", tmp_path / "m")


def test_local_directory_replaced_when_the_source_changes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one")
    (src / "old.txt").write_text("old")
    dest = tmp_path / "dest"
    fetch(str(src), dest)
    (src / "old.txt").unlink()
    (src / "a.txt").write_text("two!")
    assert fetch(f"file://{src}", dest) is True  # another uri string, and new content
    assert sorted(p.name for p in dest.iterdir()) == [".fetch-manifest.json", "a.txt"]  # old.txt gone with the old copy
    assert (dest / "a.txt").read_text() == "two!"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "dest.lock", "src"]


def test_refuses_to_replace_a_directory_fetch_did_not_write(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="already holds files that fetch did not write"):
        fetch(str(tmp_path / "src"), tmp_path / "mine")
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"


def test_disk_full_while_writing_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "big.bin").write_bytes(b"x" * 1000)

    def no_space(src, dst, desc):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(local_source, "_copy", no_space)
    with pytest.raises(UserError, match=rf"disk full while writing into {tmp_path / 'out'} \(needed 1.0 KB"):
        fetch(str(tmp_path / "big.bin"), tmp_path / "out" / "big.bin")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["big.bin.lock"]


def test_recipe_form_fetches_the_named_sources(tmp_path, capsys):
    data = tmp_path / "raw.jsonl"
    data.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n')
    dest = tmp_path / "shared" / "data.jsonl"
    overrides = [f"runner.sources.train_data.uri={data}", f"runner.sources.train_data.dest={dest}"]
    rc = cli.main(["fetch", str(REPO_ROOT / "recipes" / "llama3-8b-dpo.yaml"), *overrides, "--only", "train_data"])
    assert rc == 0
    assert dest.read_text() == data.read_text()
    assert "[train_data]" in capsys.readouterr().out
    rc = cli.main(["fetch", str(REPO_ROOT / "recipes" / "llama3-8b-dpo.yaml"), "--only", "nope"])
    assert rc == 2 and "not in runner.sources" in capsys.readouterr().err


def test_explicit_form_needs_uri_and_dest(capsys):
    assert cli.main(["fetch", "--uri", "s3://b/k"]) == 2
    assert "--uri and --dest go together" in capsys.readouterr().err
