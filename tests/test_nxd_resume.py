"""Resuming a tensor-parallel (NxD layout) run: the newest complete checkpoint is found by the
step its save recorded, a save killed before NxD's `done` marker is skipped, and the trainer
hands that tag to nxd.load_checkpoint (faked here: NxD runs only in the Neuron DLC)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

from recipe_runner.backends.nxd.trainer import NxdTrainer, newest_nxd_checkpoint


def fake_save(root: Path, tag: str, step: int, done: bool = True) -> Path:
    d = root / tag
    (d / "model").mkdir(parents=True)
    torch.save({"step": step, "consumed_samples": step * 16}, d / "user_content.pt")
    if done:
        (d / "done").write_text("1")
    return d


def test_newest_complete_checkpoint_by_step(tmp_path):
    root = tmp_path / "checkpoints"
    assert newest_nxd_checkpoint(root) is None
    fake_save(root, "run--step=10", 10)
    fake_save(root, "run--step=30", 30)
    fake_save(root, "run--step=20", 20)  # names do not sort by step; the recorded step decides
    fake_save(root, "run--step=40", 40, done=False)  # killed mid-save
    assert newest_nxd_checkpoint(root).name == "run--step=30"


def test_resume_loads_that_tag_through_nxd(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    fake_save(root, "a", 10)
    fake_save(root, "b", 20)
    calls = []

    def load_checkpoint(path, tag=None, model=None, optimizer=None, scheduler=None, **_):
        calls.append((path, tag, model, optimizer, scheduler))
        return torch.load(Path(path) / tag / "user_content.pt", weights_only=True)

    monkeypatch.setitem(sys.modules, "neuronx_distributed", types.SimpleNamespace(load_checkpoint=load_checkpoint))
    trainer = NxdTrainer.__new__(NxdTrainer)  # no NxD here: only the resume step is exercised
    trainer.r = types.SimpleNamespace(exp_manager=types.SimpleNamespace(resume_if_exists=True))
    trainer.run_dir, trainer.main = tmp_path, True
    trainer.model, trainer.optimizer, trainer.scheduler = "model", "optimizer", "scheduler"
    trainer.step = trainer.consumed = 0
    trainer._resume()
    assert calls == [(str(root), "b", "model", "optimizer", "scheduler")]
    assert (trainer.step, trainer.consumed) == (20, 320)

    trainer.r.exp_manager.resume_if_exists = False
    trainer.step = 0
    trainer._resume()
    assert trainer.step == 0 and len(calls) == 1
