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


def test_bench_layout_and_precision_defaults(tmp_path, capsys):
    from recipe_runner.bench import bench_layout

    assert bench_layout("auto", "cuda", "orca") == "packed+shared"
    assert bench_layout("auto", "cuda", "fixed") == "shared"
    assert bench_layout("auto", "cpu", "orca") == "shared"
    assert bench_layout("rows", "cuda", "orca") == "rows"
    report, _ = _bench(tmp_path, capsys, "--no-trl", "--lengths", "fixed", "--seq", "48", "--attention", "eager")
    settings = report["runs"][0]["ours"]["settings"]
    assert "attention=eager" in settings and "precision=fp32" in settings


def test_gpu_script_invocations_parse():
    """bench/gpu.sh is run once on a lent GPU with no second try: every bench line in it must be
    a valid invocation of this CLI (a typo would cost the session's device time)."""
    import argparse
    import re
    import shlex
    from pathlib import Path

    from recipe_runner.bench import add_arguments

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    text = (Path(__file__).resolve().parents[1] / "bench/gpu.sh").read_text()
    calls = [m.groups() for line in text.splitlines()
             if (m := re.search(r"\bbench (\S+) (\d+) (.+?)\s*(?:;;)?$", line.split("#")[0]))]
    assert [c[0] for c in calls] == ["smoke", "1b-fixed", "1b-orca", "8b-fixed"]
    for name, limit, args in calls:
        ns = parser.parse_args(shlex.split(args))
        assert ns.steps > ns.warmup
        runs = 2 * (2 if ns.lengths == "both" else 1)  # two engines per length kind
        assert runs * ns.timeout + 20 <= int(limit), f"{name}: the outer limit must cover every engine run"
    assert {parser.parse_args(shlex.split(c[2])).shape for c in calls} == {"tiny", "llama3.2-1b", "llama3-8b"}
