"""`recipe-runner report`: plots and report.md from a synthetic but realistic metrics.jsonl."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from recipe_runner.cli import main
from recipe_runner.deploy.run_metrics import load_metrics, steady_throughput
from recipe_runner.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, steps: int = 40, orpo: bool = False, val_every: int = 10) -> None:
    """A metrics.jsonl shaped like the trainer's: one object per step, validation objects in between,
    a non-finite value written as null, and a half-written last line (the run is still going)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        margin = 0.05 * step
        record = {
            "step": step, "consumed_samples": 8 * step, "reduced_train_loss": 0.6931 * math.exp(-step / 30),
            "chosen_rewards": margin * 0.6, "rejected_rewards": -margin * 0.4, "reward_margin": margin,
            "reward_accuracy": min(1.0, 0.5 + step / 80), "chosen_logps": -120.0 + step * 0.1,
            "rejected_logps": -130.0 - step * 0.2, "lr": 5e-7 * min(1.0, step / 10),
            "gradient_norm": 2.0 / step ** 0.5, "parameter_norm": 1520.3 + step * 1e-3,
            "throughput": 0.4 if step == 1 else 5.0 + (step % 3) * 0.1, "tokens_per_s": 4100.0 * (0.08 if step == 1 else 1.0),
        }
        if orpo:
            record.update(nll_loss=1.9 - step * 0.01, log_odds_ratio=-0.7 + step * 0.005, log_odds_chosen=0.1 * step)
        if step == 7:
            record["gradient_norm"] = None  # the trainer writes NaN/inf as null
        lines.append(json.dumps(record))
        if step % val_every == 0:
            lines.append(json.dumps({"step": step, "val_loss": 0.70 - step * 0.004, "val_reward_accuracy": 0.5 + step / 100,
                                     "val_reward_margin": 0.03 * step, "val_chosen_rewards": 0.02 * step,
                                     "val_rejected_rewards": -0.01 * step}))
    text = "\n".join(lines) + '\n{"step": 41, "consumed_sam'
    (run_dir / "metrics.jsonl").write_text(text)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_dpo_report_has_plots_and_summary(tmp_path, capsys):
    run = tmp_path / "dpo_run"
    write_run(run)
    (run / "provenance.json").write_text(json.dumps({
        "recipe_sha256": "9f2c1e0b" * 8, "git_commit": "4f2a9c1d0e9b8a7f6e5d4c3b2a1f0e9d8c7b6a59", "device": "xla",
        "world_size": 32, "algorithm": "dpo", "seed": 1234, "versions": {"torch": "2.9.0", "neuronx-distributed": "0.19.0"},
    }))
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out.strip()
    report = run / "report" / "report.md"
    assert out == str(report)

    expected = {"loss.png", "rewards.png", "reward_accuracy.png", "logps.png", "lr.png", "grad_norm.png",
                "throughput.png", "validation.png"}
    assert {p.name for p in report.parent.glob("*.png")} == expected  # no orpo.png for a DPO run
    for name in expected:
        path = report.parent / name
        width, height = png_size(path)
        assert (width, height) >= (600, 250) and path.stat().st_size > 10_000, name
    # three validation panels make a taller figure than a single-panel plot
    assert png_size(report.parent / "validation.png")[1] > 2 * png_size(report.parent / "lr.png")[1]

    md = report.read_text()
    final_loss = 0.6931 * math.exp(-40 / 30)
    first_loss = 0.6931 * math.exp(-1 / 30)
    assert f"| reduced_train_loss | {first_loss:.4g} | {final_loss:.4g} | {final_loss:.4g} (40) |" in md
    assert "| reward_accuracy | 0.5125 | 1 | 1 (40) |" in md
    assert "| reward_margin | 0.05 | 2 | 2 (40) |" in md
    assert "- Training steps logged: 40 (step 1 to 40)" in md and "- Consumed samples: 320" in md
    steady = sum(5.0 + (s % 3) * 0.1 for s in range(2, 41)) / 39  # first step (compile) left out
    assert f"{steady:.4g} pairs/s" in md
    assert "## Final validation (step 40)" in md and "| val_loss | 0.54 |" in md and "| val_reward_accuracy | 0.9 |" in md
    assert "| recipe hash | `" + "9f2c1e0b" * 8 + "` |" in md and "| world size | `32` |" in md
    assert "| versions | torch 2.9.0, neuronx-distributed 0.19.0 |" in md
    for name in expected:
        assert f"]({name})" in md


def test_orpo_run_without_validation(tmp_path, capsys):
    run = tmp_path / "orpo_run"
    write_run(run, steps=12, orpo=True, val_every=1000)
    out = tmp_path / "elsewhere"
    assert main(["report", str(run), "--out", str(out)]) == 0
    names = {p.name for p in out.glob("*.png")}
    assert "orpo.png" in names and "validation.png" not in names
    md = (out / "report.md").read_text()
    assert "| nll_loss | 1.89 | 1.78 | 1.78 (12) |" in md
    assert "Final validation" not in md and "Provenance" not in md
    # re-running is safe and gives the same report
    first = md
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert (out / "report.md").read_text() == first
    assert not list(out.glob(".*.tmp"))


def test_loader_splits_train_and_validation_and_skips_partial_line(tmp_path):
    write_run(tmp_path, steps=20)
    m = load_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in m.train] == list(range(1, 21))
    assert [r["step"] for r in m.val] == [10, 20]
    assert m.skipped_lines == [23]  # the half-written line at the end
    steps, values = m.series("gradient_norm")
    assert 7 not in steps and len(values) == 19  # null skipped, not plotted as zero
    assert steady_throughput(m) == pytest.approx(sum(5.0 + (s % 3) * 0.1 for s in range(2, 21)) / 19)


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_missing_or_empty_metrics_is_a_user_error(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and ("not found" in err if content is None else "no metric records" in err)
    assert not (run / "report").exists()
    with pytest.raises(UserError):
        load_metrics(run / "metrics.jsonl")


def test_missing_run_dir_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reads_what_the_trainers_metrics_logger_writes(tmp_path, capsys):
    """The contract with train/metrics.py: report reads the file the trainer writes."""
    from recipe_runner.train.metrics import MetricsLogger

    logger = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step, 3, {"consumed_samples": 4 * step, "reduced_train_loss": 0.7 - 0.1 * step, "reward_accuracy": 0.25 * step,
                             "chosen_rewards": 0.01 * step, "rejected_rewards": -0.01 * step, "reward_margin": 0.02 * step,
                             "lr": 1e-6, "gradient_norm": float("nan"), "throughput": 2.0, "tokens_per_s": 500.0})
    logger.log(3, 3, {"val_loss": 0.45, "val_reward_accuracy": 0.75, "val_reward_margin": 0.05}, prefix="val_")
    logger.close()
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| reduced_train_loss | 0.6 | 0.4 | 0.4 (3) |" in md and "| val_loss | 0.45 |" in md
    assert not (tmp_path / "report" / "grad_norm.png").exists()  # only NaN (null) gradient norms: no plot
    assert (tmp_path / "report" / "validation.png").read_bytes()[:8] == PNG_SIGNATURE
