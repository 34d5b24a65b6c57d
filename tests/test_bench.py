"""`recipe-runner bench` runs both engines on the tiny shape and writes the report (speed is
reported, not asserted: these tests check that the numbers exist and are consistent)."""

from __future__ import annotations

import json

import pytest

from recipe_runner.cli import main

RESULT_KEYS = {"pairs_per_s", "tokens_per_s_all", "tokens_per_s_real", "median_step_s", "steps_timed",
               "real_tokens_per_step", "setup_incl_precompute_s", "settings", "engine", "loss_last"}


def _bench(tmp_path, capsys, *args):
    out = tmp_path / "bench.json"
    assert main(["bench", "--shape", "tiny", "--steps", "3", "--warmup", "1", "--pairs", "2", "--threads", "1",
                 "--json", str(out), *args]) == 0
    printed = capsys.readouterr().out
    return json.loads(out.read_text()), printed


def _check(result: dict, engine: str, pairs: int) -> None:
    assert RESULT_KEYS <= set(result), RESULT_KEYS - set(result)
    assert result["engine"] == engine and result["steps_timed"] == 2
    assert result["pairs_per_s"] == pytest.approx(pairs / result["median_step_s"], rel=1e-2)
    assert result["tokens_per_s_real"] > 0 and result["tokens_per_s_all"] > 0
    assert result["peak_rss_mib"] > 50  # CPU run: the worker's peak resident memory
    assert 0.5 < result["loss_last"] < 0.9  # a DPO loss near log 2 after a few tiny steps at lr 1e-6


def test_bench_ours_only_both_length_kinds(tmp_path, capsys):
    report, printed = _bench(tmp_path, capsys, "--no-trl", "--lengths", "both", "--seq", "96")
    assert report["device"] == "cpu" and "no GPU" in report["note"]
    assert [r["lengths"] for r in report["runs"]] == ["fixed", "orca"]
    for run in report["runs"]:
        assert "trl" not in run and "ratio" not in run
        _check(run["ours"], "ours", 2)
        assert "packing=False, prefix_sharing=True" in run["ours"]["settings"]
    fixed = report["runs"][0]["ours"]
    # fixed: every sequence is 96 tokens (BOS + 47 + 47 + EOS), prompts shared: fewer positions than tokens
    assert fixed["real_tokens_per_step"] == 2 * 2 * 96
    assert fixed["tokens_per_s_all"] < fixed["tokens_per_s_real"]
    assert "x TRL pairs/s" in printed and "no GPU" in printed


def test_bench_against_trl(tmp_path, capsys):
    report, printed = _bench(tmp_path, capsys, "--lengths", "fixed", "--seq", "64", "--layout", "rows")
    (run,) = report["runs"]
    _check(run["ours"], "ours", 2)
    _check(run["trl"], "trl", 2)
    # same pairs, same text: both engines count (nearly) the same real tokens (BOS/EOS handling may differ)
    assert run["trl"]["real_tokens_per_step"] == pytest.approx(run["ours"]["real_tokens_per_step"], rel=0.05)
    assert run["ratio"]["pairs_per_s"] == pytest.approx(run["ours"]["pairs_per_s"] / run["trl"]["pairs_per_s"], rel=1e-2)
    assert " trl " in printed and "TRL DPOTrainer" in printed
