"""Checkpoint and metrics-logger units: atomic saves, pruning, re-saves, resume truncation."""

from __future__ import annotations

import json

import torch

from recipe_runner.train import checkpoint as ckpt
from recipe_runner.train.metrics import MetricsLogger


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _parts():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def test_checkpoint_atomic_prune_and_resave(tmp_path):
    model, opt, sched = _parts()
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / ".tmp-half-written").mkdir()  # a save killed half-way
    (root / ".tmp-half-written" / ckpt.STATE_FILE).write_text('{"step": 99}')
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in range(1, 5):
        ckpt.save_checkpoint(tmp_path, f"c{step}", model=model, optimizer=opt, scheduler=sched,
                             state={"step": step, "consumed_samples": step}, save_top_k=2)
    assert not list(root.glob(".tmp-*"))
    assert [(s, p.name) for s, p in ckpt.list_checkpoints(tmp_path)] == [(3, "c3"), (4, "c4")]
    assert ckpt.latest_checkpoint(tmp_path).name == "c4"
    with torch.no_grad():
        model.weight.fill_(7.0)
    ckpt.save_checkpoint(tmp_path, "c4", model=model, optimizer=opt, scheduler=sched,
                         state={"step": 4, "consumed_samples": 4}, save_top_k=-1)  # same step again: replaced
    fresh, _, _ = _parts()
    assert ckpt.load_checkpoint(root / "c4", model=fresh)["step"] == 4
    assert torch.equal(fresh.weight, torch.full((2, 3), 7.0))
    for step in (5, 6, 7):
        ckpt.save_checkpoint(tmp_path, f"c{step}", model=model, optimizer=opt, scheduler=sched,
                             state={"step": step, "consumed_samples": step}, save_top_k=-1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4, 5, 6, 7]  # -1 keeps all
    assert ckpt.checkpoint_name("x--{step}-{consumed_samples}", name="n", step=3, consumed_samples=48) == \
        "x--step=3-consumed_samples=48"


def test_metrics_logger_truncates_to_resumed_step(tmp_path, capsys):
    log = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False)
    for s in range(1, 6):
        log.log(s, 5, {"reduced_train_loss": 1.0 / s, "consumed_samples": 4 * s})
    log.log(4, 5, {"val_loss": 0.5}, prefix="val_")
    log.close()
    out = capsys.readouterr().out
    assert "\r" not in out and out.count("\n") == 6 and out.startswith("step 1/5 | consumed_samples 4 | ")
    MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, resume_step=3).close()
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
