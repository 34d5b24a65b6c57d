"""fetch over http against a local server with injected faults: drops, 5xx, kill -9, corruption,
manifest skips, and two fetches of one destination at the same moment."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from recipe_runner import cli
from recipe_runner.errors import UserError
from recipe_runner.prepare import fetch as fetch_mod
from recipe_runner.prepare import transfer

PAYLOAD = bytes(range(256)) * 8192  # 2 MiB, every byte position distinguishable


class FaultServer:
    """Serves `files`; `plan[path]` lists what successive GETs do: ok | drop | 500 | 503 | slow."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.plan: dict[str, list[str]] = {}
        self.gets: Counter[str] = Counter()
        self.heads: Counter[str] = Counter()
        self.slow_chunk_delay = 0.05
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _headers(self, body: bytes) -> None:
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"' + hashlib.md5(body).hexdigest() + '"')
                self.send_header("Last-Modified", "Tue, 01 Oct 2024 10:00:00 GMT")
                self.end_headers()

            def do_HEAD(self) -> None:
                server.heads[self.path] += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self._headers(body)

            def do_GET(self) -> None:
                server.gets[self.path] += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                steps = server.plan.get(self.path) or []
                action = steps.pop(0) if steps else "ok"
                if action in ("500", "503"):
                    self.send_error(int(action))
                    return
                self.send_response(200)
                self._headers(body)
                if action == "drop":  # promise the whole file, send half, hang up
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if action == "slow":
                    for i in range(0, len(body), 65536):
                        self.wfile.write(body[i:i + 65536])
                        self.wfile.flush()
                        time.sleep(server.slow_chunk_delay)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FaultServer()
    s.files["/data.bin"] = PAYLOAD
    yield s
    s.close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(transfer, "BASE_DELAY_S", 0.01)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _fetch_cmd(url: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "recipe_runner.cli", "fetch", "--uri", url, "--dest", str(dest)]


def test_dropped_connection_is_retried_and_the_file_is_complete(server, tmp_path, capsys):
    server.plan["/data.bin"] = ["drop", "ok"]
    dest = tmp_path / "out" / "data.bin"
    assert fetch_mod.fetch(server.url + "/data.bin", dest, sha256=_sha(PAYLOAD)) is True
    assert dest.read_bytes() == PAYLOAD
    assert server.gets["/data.bin"] == 2
    assert "attempt 1/5 failed" in capsys.readouterr().err


def test_5xx_twice_then_success(server, tmp_path, capsys):
    server.plan["/data.bin"] = ["503", "500", "ok"]
    dest = tmp_path / "data.bin"
    fetch_mod.fetch(server.url + "/data.bin", dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.gets["/data.bin"] == 3
    err = capsys.readouterr().err
    assert "attempt 1/5 failed (HTTP 503" in err and "attempt 2/5 failed (HTTP 500" in err


def test_persistent_5xx_gives_up_with_a_user_error(server, tmp_path):
    server.plan["/data.bin"] = ["503"] * 10
    with pytest.raises(UserError, match="gave up after 5 attempts"):
        fetch_mod.fetch(server.url + "/data.bin", tmp_path / "data.bin")
    assert server.gets["/data.bin"] == 5
    assert not (tmp_path / "data.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin.lock"]  # no temp file left behind


def test_second_run_is_skipped_by_the_manifest(server, tmp_path, capsys):
    dest = tmp_path / "data.bin"
    assert fetch_mod.fetch(server.url + "/data.bin", dest) is True
    manifest = json.loads((tmp_path / "data.bin.manifest.json").read_text())
    assert manifest["files"] == [{"path": "data.bin", "size": len(PAYLOAD), "sha256": _sha(PAYLOAD)}]
    assert manifest["identity"]["etag"] == '"' + hashlib.md5(PAYLOAD).hexdigest() + '"'
    assert fetch_mod.fetch(server.url + "/data.bin", dest) is False
    assert server.gets["/data.bin"] == 1  # the restart did a HEAD, no GET
    assert "up to date" in capsys.readouterr().out


def test_changed_source_or_damaged_copy_is_fetched_again(server, tmp_path):
    dest = tmp_path / "data.bin"
    fetch_mod.fetch(server.url + "/data.bin", dest)
    server.files["/data.bin"] = PAYLOAD[::-1]  # new ETag
    assert fetch_mod.fetch(server.url + "/data.bin", dest) is True
    assert dest.read_bytes() == PAYLOAD[::-1]
    with open(dest, "ab") as f:  # someone appended to the copy: sizes differ
        f.write(b"x")
    assert fetch_mod.fetch(server.url + "/data.bin", dest) is True
    assert dest.read_bytes() == PAYLOAD[::-1]
    assert server.gets["/data.bin"] == 3


def test_checksum_mismatch_is_an_error_and_leaves_nothing(server, tmp_path):
    server.files["/data.bin"] = PAYLOAD[:-1] + b"\x00"  # corrupted at the source
    dest = tmp_path / "data.bin"
    with pytest.raises(UserError, match="checksum mismatch: expected sha256 " + _sha(PAYLOAD)):
        fetch_mod.fetch(server.url + "/data.bin", dest, sha256=_sha(PAYLOAD))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin.lock"]


def test_missing_file_and_cli_exit_code(server, tmp_path, capsys):
    rc = cli.main(["fetch", "--uri", server.url + "/nope.bin", "--dest", str(tmp_path / "x")])
    assert rc == 2
    assert "not found (HTTP 404)" in capsys.readouterr().err


def test_dest_directory_gets_the_file_name(server, tmp_path):
    fetch_mod.fetch(server.url + "/data.bin", str(tmp_path) + "/")
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD


def test_kill_9_mid_download_then_rerun(server, tmp_path):
    server.plan["/data.bin"] = ["slow"]
    dest = tmp_path / "data.bin"
    proc = subprocess.Popen(_fetch_cmd(server.url + "/data.bin", dest), env=_cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    partial: list[Path] = []
    while time.monotonic() < deadline and not partial:  # wait until bytes are on disk
        partial = [p for p in tmp_path.glob(".data.bin.fetch-tmp-*/data.bin") if p.stat().st_size > 0]
        time.sleep(0.02)
    assert partial, f"the download never started (fetch exit status {proc.poll()})"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dest.exists()  # the half-written file has a temp name, never the destination's
    assert not (tmp_path / "data.bin.manifest.json").exists()

    done = subprocess.run(_fetch_cmd(server.url + "/data.bin", dest), env=_cli_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "leftovers of an interrupted fetch" in done.stderr
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "data.bin.lock", "data.bin.manifest.json"]


def test_two_concurrent_fetches_download_once(server, tmp_path):
    server.plan["/data.bin"] = ["slow"]
    server.slow_chunk_delay = 0.1  # ~3 s of download: the second process starts well within it
    dest = tmp_path / "shared" / "data.bin"
    procs = [subprocess.Popen(_fetch_cmd(server.url + "/data.bin", dest), env=_cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert dest.read_bytes() == PAYLOAD
    assert server.gets["/data.bin"] == 1
    joined = "".join(o + e for o, e in outs)
    assert "up to date" in joined and "ready: 1 file(s)" in joined
    assert "another process is working on" in joined  # the second one waited on the lock
