"""Engine invariants on the tiny assets (CPU): gradient accumulation 4x1 == 1x4, a resumed run
(simulated crash and real SIGKILL) == the uninterrupted one bitwise, precompute on == off,
reference log-probs attached to their pairs, weight_init_only semantics."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from recipe_runner.train import checkpoint as ckpt
from recipe_runner.train import reference
from recipe_runner.train.loop import Trainer
from recipe_runner.train.metrics import METRIC_KEYS

from train_support import _baked_commit, cache  # noqa: F401 (module fixtures)
from train_support import (COMMIT, LN2, REPO, SMALL, final_weights, overrides, records,
                           train_records, trainer, untimed)


# ============================================================================ invariants
def test_gradient_accumulation_4x1_equals_1x4(tmp_path, cache):
    runs = {}
    for mbs in (1, 4):
        t = trainer("tiny-dpo.yaml", tmp_path / f"mbs{mbs}", cache, *SMALL, "trainer.max_steps=3",
                    f"data.micro_batch_size={mbs}", "exp_manager.create_checkpoint_callback=false")
        with contextlib.redirect_stdout(io.StringIO()):
            t.run()
        runs[mbs] = (untimed(records(tmp_path / f"mbs{mbs}")), {k: v.clone() for k, v in t.model.state_dict().items()})
    (m1, w1), (m4, w4) = runs[1], runs[4]
    assert len(m1) == len(m4) == 3
    for a, b in zip(m1, m4):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k)
    assert m1[0]["reduced_train_loss"] == pytest.approx(LN2, abs=1e-6)
    assert m1[-1]["reduced_train_loss"] < LN2 - 1e-3  # the runs did move
    for k in w1:
        torch.testing.assert_close(w1[k], w4[k], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    t = trainer("tiny-dpo.yaml", run_dir, cache, *SMALL)
    with contextlib.redirect_stdout(io.StringIO()):
        t.run()
    return run_dir


class _Crash(Exception):
    pass


def test_resume_after_crash_equals_uninterrupted(uninterrupted, tmp_path, cache, monkeypatch):
    run_dir = tmp_path / "crashed"
    original = Trainer._val_due

    def crash_at_3(self, step):  # runs right after step `step` was logged
        if step == 3:
            raise _Crash
        return original(self, step)

    monkeypatch.setattr(Trainer, "_val_due", crash_at_3)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(_Crash):
        trainer("tiny-dpo.yaml", run_dir, cache, *SMALL).run()
    monkeypatch.setattr(Trainer, "_val_due", original)
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3]
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]
    # a save killed half-way (even one that got as far as its state file) is never resumed from
    stale = run_dir / "checkpoints" / ".tmp-tiny_dpo--step=4-consumed_samples=16"
    stale.mkdir()
    (stale / ckpt.STATE_FILE).write_text(json.dumps({"step": 4, "consumed_samples": 16}))
    assert ckpt.latest_checkpoint(run_dir).name == "tiny_dpo--step=2-consumed_samples=8"

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer("tiny-dpo.yaml", run_dir, cache, *SMALL).run()
    assert "resumed from" in out.getvalue() and "(step 2)" in out.getvalue()
    assert not stale.exists()  # cleaned by the next save
    assert untimed(records(run_dir)) == untimed(records(uninterrupted))  # step 3 logged once, bitwise equal
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 4, 6, 8]
    assert final_weights(run_dir) == final_weights(uninterrupted)


def test_sigkill_and_resume_equals_uninterrupted(uninterrupted, tmp_path, cache):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "recipe_runner.cli", "train", str(REPO / "recipes/tiny-dpo.yaml"),
           *overrides(run_dir, cache, *SMALL)]
    # the same thread count as this process, which runs the other half: other counts sum floats in another order
    env = dict(os.environ, RECIPE_RUNNER_GIT_COMMIT=COMMIT, OMP_NUM_THREADS=str(torch.get_num_threads()))
    with open(tmp_path / "stderr.txt", "wb") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, env=env)
        try:
            deadline = time.monotonic() + 240
            while proc.poll() is None and not ckpt.list_checkpoints(run_dir) and time.monotonic() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    err = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed (rc {proc.returncode}): {err[-2000:]}"
    saved = [s for s, _ in ckpt.list_checkpoints(run_dir)]
    assert saved and saved[-1] < 8, saved

    with contextlib.redirect_stdout(io.StringIO()):
        trainer("tiny-dpo.yaml", run_dir, cache, *SMALL).run()
    assert untimed(records(run_dir)) == untimed(records(uninterrupted))
    assert final_weights(run_dir) == final_weights(uninterrupted)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_precompute_off_matches_precompute_on(uninterrupted, tmp_path, cache):
    t = trainer("tiny-dpo.yaml", tmp_path, cache, *SMALL, "model_alignment_strategy.dpo.precompute_ref_log_probs=false")
    with contextlib.redirect_stdout(io.StringIO()):
        t.setup()
    assert t.ref_model is not None and not t.ref_tables
    on = train_records(uninterrupted)[:2]
    for step, want in zip((0, 1), on):
        got = t.train_step(step)
        for k in METRIC_KEYS + ("lr", "gradient_norm"):
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), (step, k)
    # the frozen copy did not follow the policy
    assert not any(p.requires_grad for p in t.ref_model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(t.ref_model.parameters(), t.model.parameters()))


def test_reference_logps_attached_to_their_pairs(uninterrupted, tmp_path, cache):
    """Table entries equal a direct per-pair computation, in any order; a step-1 loss of exactly
    ln 2 with and without shuffling shows every pair met its own reference."""
    first = train_records(uninterrupted)[0]  # shuffle: true (the recipe's)
    assert first["reduced_train_loss"] == pytest.approx(LN2, abs=1e-6) and first["reward_accuracy"] == 0.0

    # own cache: the table comes from micro-batches of 8, unlike any batch scored below
    t = trainer("tiny-dpo.yaml", tmp_path, tmp_path / "cache", *SMALL, "runner.data.shuffle=false",
                "data.micro_batch_size=8", "data.global_batch_size=8")
    with contextlib.redirect_stdout(io.StringIO()):
        t.setup()
    table = t.ref_tables["train"]
    order = torch.randperm(len(t.train_ex), generator=torch.Generator().manual_seed(5)).tolist()
    shuffled = [t.train_ex[i] for i in order]
    t.model.eval()
    with torch.no_grad():
        for s in range(0, len(shuffled), 3):  # batches that differ from the precompute's
            batch = shuffled[s:s + 3]
            direct = reference.pair_logprobs(t.model, batch, device="cpu", pad_id=t.pad_id, pad_to=None,
                                             autocast=contextlib.nullcontext)
            rc, rr = reference.lookup(table, [e["id"] for e in batch], "cpu")
            torch.testing.assert_close(rc, direct["chosen"], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(rr, direct["rejected"], atol=1e-4, rtol=1e-5)
        # policy == reference in batches unlike the precompute's (other padding widths, so other
        # last bits): every pair is a tie, loss ln 2, accuracy 0
        for size in (1, 3):
            for s in range(0, len(shuffled), size):
                out = t.pair_metrics(shuffled[s:s + size], "train")
                torch.testing.assert_close(out["loss"], torch.full_like(out["loss"], LN2), atol=2e-6, rtol=0)
                assert out["reward_accuracy"].sum().item() == 0, (size, s, out["reward_margin"])
    t.model.train()
    # chosen and rejected are distinct answers, so a swapped or shifted row would be visible
    assert (table[:, 0] - table[:, 1]).abs().min() > 1e-3
    vals = t.train_step(0)
    assert vals["reduced_train_loss"] == pytest.approx(LN2, abs=1e-6)
    assert vals["reward_accuracy"] == 0.0


def test_reference_cache_reused_across_subset_sizes(tmp_path):
    """A cache written for dev_choose_samples=8 must not be served to a run over 12 pairs."""
    shared = tmp_path / "cache"
    for n in (8, 12):
        t = trainer("tiny-dpo.yaml", tmp_path / f"n{n}", shared, *SMALL, f"data.dev_choose_samples={n}")
        with contextlib.redirect_stdout(io.StringIO()):
            t.setup()
        rc, rr = reference.lookup(t.ref_tables["train"], [e["id"] for e in t.train_ex], "cpu")
        assert torch.isfinite(rc).all() and torch.isfinite(rr).all() and len(rc) == n


def test_weight_init_only_loads_weights_not_optimizer_state(uninterrupted, tmp_path, cache):
    start = ckpt.list_checkpoints(uninterrupted)[0][1]  # step 2: weights that differ from the asset
    t = trainer("tiny-dpo.yaml", tmp_path, cache, *SMALL, f"exp_manager.resume_from_checkpoint={start}",
                "model.weight_init_only=true")
    with contextlib.redirect_stdout(io.StringIO()):
        t.setup()
    saved = load_file(str(start / "model.safetensors"))
    state = t.model.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    assert t.step == 0 and t.consumed == 0
    assert not t.optimizer.state  # fresh Adam moments
    assert t.scheduler.last_epoch == 0
    vals = t.train_step(0)  # the reference is the loaded weights too
    assert vals["reduced_train_loss"] == pytest.approx(LN2, abs=1e-6)
    assert vals["lr"] == pytest.approx(train_records(uninterrupted)[0]["lr"])  # schedule starts over
