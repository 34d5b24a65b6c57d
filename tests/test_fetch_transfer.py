"""The pieces every transfer shares: log-friendly progress, bounded retries, the lock."""

from __future__ import annotations

import threading
import time

import pytest

from recipe_runner.errors import UserError
from recipe_runner.prepare import transfer
from recipe_runner.prepare.transfer import LineProgress, TransientError, exclusive, with_retries


def test_progress_for_logs_is_a_line_per_ten_percent(capsys):
    bar = LineProgress(100 << 20, "s3://b/model.safetensors")
    for _ in range(100):
        bar.update(1 << 20)
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err
    assert [line.split(": ")[1].split(" ")[0] for line in lines[:-1]] == [f"{p}%" for p in range(10, 100, 10)]
    assert lines[-1] == "s3://b/model.safetensors: done (104.9 MB)"


def test_small_files_print_no_progress(capsys):
    bar = LineProgress(1000, "config.json")
    for _ in range(10):
        bar.update(100)
    bar.close()
    assert capsys.readouterr().err == ""


def test_retries_back_off_exponentially_and_are_bounded(monkeypatch, capsys):
    sleeps = []
    monkeypatch.setattr(transfer.time, "sleep", sleeps.append)
    calls = []

    def always_fails():
        calls.append(1)
        raise TransientError("HTTP 503")

    with pytest.raises(UserError, match="gave up after 4 attempts; last error: HTTP 503"):
        with_retries(always_fails, "GET x", attempts=4)
    assert len(calls) == 4 and sleeps == [1.0, 2.0, 4.0]
    assert capsys.readouterr().err.count("retrying in") == 3


def test_user_errors_are_not_retried():
    calls = []

    def missing():
        calls.append(1)
        raise UserError("not found")

    with pytest.raises(UserError, match="not found"):
        with_retries(missing, "GET x")
    assert calls == [1]


def test_lock_makes_the_second_holder_wait(tmp_path, capsys):
    order = []
    entered = threading.Event()

    def first():
        with exclusive(tmp_path / "dest", "fetch"):
            entered.set()
            order.append("first in")
            time.sleep(0.3)
            order.append("first out")

    t = threading.Thread(target=first)
    t.start()
    entered.wait(5)
    with exclusive(tmp_path / "dest", "fetch"):
        order.append("second in")
    t.join()
    assert order == ["first in", "first out", "second in"]
    assert "another process is working on" in capsys.readouterr().err
