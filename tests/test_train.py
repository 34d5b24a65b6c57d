"""The training engine end to end on the embedded tiny assets (CPU): the recipes learn, the
first step is ln 2, gradient accumulation and resuming (simulated and real SIGKILL) reproduce
the uninterrupted run, reference log-probs stay attached to their pairs, checkpoints are atomic
and pruned, metrics/TensorBoard/provenance/export are complete.

Runs are small (16-128 pairs, 1-8 steps) and share one tokenization/reference cache; the runs
several tests compare against are module-scoped fixtures."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipe_runner.recipe import load_recipe
from recipe_runner.train import checkpoint as ckpt
from recipe_runner.train import reference
from recipe_runner.train.loop import METRIC_KEYS, Trainer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL is a test-only reference here
REPO = Path(__file__).resolve().parents[1]
LN2 = math.log(2)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TIMING = {"throughput", "throughput_peak", "tokens_per_s"}
TRAIN_KEYS = {"step", "consumed_samples", "reduced_train_loss", "chosen_rewards", "rejected_rewards", "reward_margin",
              "reward_accuracy", "chosen_logps", "rejected_logps", "lr", "gradient_norm", "parameter_norm",
              "throughput", "tokens_per_s"}
ORPO_EXTRA = {"nll_loss", "log_odds_ratio", "log_odds_chosen"}
ALLOWED_EXTRA = {"throughput_peak"}  # NxDT's progress bar logs it too (seed tutorial)
VAL_KEYS = {"step", "val_loss", "val_chosen_rewards", "val_rejected_rewards", "val_reward_margin",
            "val_reward_accuracy", "val_chosen_logps", "val_rejected_logps"}
# a small DPO run: 16 pairs, global batch 4 in micro-batches of 2, no validation
SMALL = ["data.dev_choose_samples=16", "data.global_batch_size=4", "data.micro_batch_size=2",
         "trainer.log_every_n_steps=1", "trainer.limit_val_batches=0", "trainer.max_steps=8",
         "exp_manager.create_tensorboard_logger=false",
         "exp_manager.checkpoint_callback_params.every_n_train_steps=2",
         "exp_manager.checkpoint_callback_params.save_top_k=-1"]


@pytest.fixture(scope="module", autouse=True)
def _baked_commit():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECIPE_RUNNER_GIT_COMMIT", COMMIT)
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Tokenized data and reference log-probs shared by the module's runs."""
    return tmp_path_factory.mktemp("cache")


def overrides(run_dir, cache_dir, *extra) -> list[str]:
    return [f"exp_manager.explicit_log_dir={run_dir}", f"runner.cache_dir={cache_dir}", "runner.device=cpu", *extra]


def trainer(name: str, run_dir, cache_dir, *extra) -> Trainer:
    return Trainer(load_recipe(REPO / "recipes" / name, overrides(run_dir, cache_dir, *extra)), "cpu")


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_records(run_dir) -> list[dict]:
    return [r for r in records(run_dir) if "reduced_train_loss" in r]


def val_records(run_dir) -> list[dict]:
    return [r for r in records(run_dir) if "val_loss" in r]


def untimed(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def final_weights(run_dir) -> bytes:
    return (ckpt.latest_checkpoint(run_dir) / "model.safetensors").read_bytes()


# ============================================================================ the tiny recipes learn
@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, cache):
    """tiny-dpo through the CLI entry point: 192 pairs, 12 steps of 16, validation every 6."""
    from recipe_runner import cli

    run_dir = tmp_path_factory.mktemp("dpo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["train", str(REPO / "recipes/tiny-dpo.yaml"), *overrides(
            run_dir, cache, "data.dev_choose_samples=192", "trainer.max_steps=12", "trainer.log_every_n_steps=1",
            "trainer.val_check_interval=6", "exp_manager.checkpoint_callback_params.every_n_train_steps=6",
            "exp_manager.checkpoint_callback_params.save_top_k=1")])
    assert rc == 0
    return run_dir, out.getvalue()


def test_dpo_learns(dpo_run):
    run_dir, _ = dpo_run
    val = val_records(run_dir)
    assert [r["step"] for r in val] == [0, 6, 12]
    first, last = val[0], val[-1]
    # the baseline: policy == reference -> loss ln 2, rewards 0, strict accuracy 0
    assert first["val_loss"] == pytest.approx(LN2, abs=1e-6)
    assert first["val_reward_accuracy"] == 0.0
    assert first["val_chosen_rewards"] == pytest.approx(0.0, abs=1e-5)
    assert first["val_reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert last["val_reward_accuracy"] > 0.9, last  # 1.0 with torch 2.13 on x86 CPUs
    assert last["val_loss"] < 0.4 and last["val_reward_margin"] > 1.0


def test_dpo_first_step_is_ln2(dpo_run):
    run_dir, _ = dpo_run
    first = train_records(run_dir)[0]
    assert first["step"] == 1 and first["consumed_samples"] == 16
    assert first["reduced_train_loss"] == pytest.approx(LN2, abs=1e-6)
    assert first["reward_accuracy"] == 0.0
    assert first["chosen_rewards"] == pytest.approx(0.0, abs=1e-5)
    assert first["rejected_rewards"] == pytest.approx(0.0, abs=1e-5)


def test_metrics_keys_tensorboard_and_progress_lines(dpo_run):
    run_dir, stdout = dpo_run
    train = train_records(run_dir)
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["consumed_samples"] for r in train] == [16 * s for s in range(1, 13)]
    for r in train:
        assert TRAIN_KEYS <= set(r) and set(r) - TRAIN_KEYS <= ALLOWED_EXTRA, sorted(set(r) ^ TRAIN_KEYS)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in r.values()), r
    for r in val_records(run_dir):
        assert set(r) == VAL_KEYS, sorted(set(r) ^ VAL_KEYS)
    assert len(records(run_dir)) == len(train) + 3  # nothing else in the file
    events = list((Path(run_dir) / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert "\r" not in stdout and stdout.endswith("\n")
    lines = stdout.splitlines()
    for s in range(1, 13):
        assert any(line.startswith(f"step {s}/12 | consumed_samples {16 * s} | reduced_train_loss ") for line in lines), s
    assert sum(line.startswith("validation step ") for line in lines) == 3


def test_provenance_complete(dpo_run):
    run_dir, _ = dpo_run
    prov = json.loads((Path(run_dir) / "provenance.json").read_text())
    assert len(prov["recipe_sha256"]) == 64 and int(prov["recipe_sha256"], 16) >= 0
    assert prov["git_commit"] == COMMIT
    for pkg in ("python", "torch", "transformers", "safetensors"):
        assert prov["versions"].get(pkg), pkg
    assert prov["versions"]["torch"] == torch.__version__.split("+")[0] or torch.__version__.startswith(
        prov["versions"]["torch"])
    assert prov["seed"] == 1234 and prov["device"] == "cpu" and prov["world_size"] == 1
    assert "source_manifests" in prov and isinstance(prov["source_manifests"], dict)
    assert prov["algorithm"] == "dpo"
    assert (Path(run_dir) / "recipe.yaml").is_file() and (Path(run_dir) / "hf" / "config.json").is_file()


def test_save_top_k_keeps_newest(dpo_run):
    run_dir, _ = dpo_run
    found = ckpt.list_checkpoints(run_dir)
    assert [s for s, _ in found] == [12]  # step 6 was saved, then pruned (save_top_k 1)
    assert found[0][1].name == "tiny_dpo--step=12-consumed_samples=192"
    assert not list((Path(run_dir) / "checkpoints").glob(".tmp-*"))


def test_export_reloads_and_reproduces_validation_logps(dpo_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from recipe_runner import cli
    from recipe_runner.data.batches import collate_pairs
    from recipe_runner.data.dataset import load_tokenized, load_tokenizer
    from recipe_runner.data.tokenize import pad_token_id
    from recipe_runner.model.logprobs import model_logprobs

    run_dir, _ = dpo_run
    out = tmp_path / "exported"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["export", str(run_dir), "--to", "hf", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = load_tokenizer(str(out), False)
    r = load_recipe(REPO / "recipes/tiny-dpo.yaml")
    examples, _ = load_tokenized(r.data.val_dir, tok, seq_length=r.data.seq_length,
                                 max_prompt_length=r.alignment.max_prompt_length,
                                 truncation_mode=r.alignment.truncation_mode)
    chosen = rejected = 0.0
    with torch.no_grad():
        for s in range(0, len(examples), 8):
            b = collate_pairs(examples[s:s + 8], pad_id=pad_token_id(tok), pad_to=None)
            sums, _ = model_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])
            n = len(examples[s:s + 8])
            chosen += sums[:n].sum().item()
            rejected += sums[n:].sum().item()
    last = val_records(run_dir)[-1]
    assert chosen / len(examples) == pytest.approx(last["val_chosen_logps"], abs=1e-4)
    assert rejected / len(examples) == pytest.approx(last["val_rejected_logps"], abs=1e-4)


def test_orpo_learns(tmp_path, cache):
    t = trainer("tiny-orpo.yaml", tmp_path, cache, "data.dev_choose_samples=128", "trainer.max_steps=8",
                "trainer.log_every_n_steps=4", "trainer.val_check_interval=4",
                "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false")
    with contextlib.redirect_stdout(io.StringIO()):
        t.run()
    val = val_records(tmp_path)
    assert [r["step"] for r in val] == [0, 4, 8]
    margins = [r["val_reward_margin"] for r in val]  # 8 steps: about 0.058 -> 0.076 -> 0.087
    assert margins[0] < margins[1] < margins[2] and margins[2] > margins[0] * 1.25, margins
    assert val[-1]["val_reward_accuracy"] >= val[0]["val_reward_accuracy"]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    for r in val:
        assert set(r) == VAL_KEYS | {f"val_{k}" for k in ORPO_EXTRA}, sorted(r)
    train = train_records(tmp_path)
    assert [r["step"] for r in train] == [4, 8]
    for r in train:
        want = TRAIN_KEYS | ORPO_EXTRA
        assert want <= set(r) and set(r) - want <= ALLOWED_EXTRA, sorted(set(r) ^ want)
        # NxDT nll scope (response tokens): nll = -mean chosen log-prob per token, so it is positive
        assert r["nll_loss"] > 0 and r["log_odds_ratio"] <= 0


def test_orpo_pair_loss_matches_trl_formula(tmp_path, cache):
    """One pair through the real model: nll_scope sequence (TRL/paper: cross-entropy over prompt
    and response of the chosen sequence) and response (NxDT), against TRL's own pieces applied to
    the full logits. (TRL averages the NLL over all tokens of a batch; per pair they agree.)"""
    import torch.nn.functional as F
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer, log1mexp as trl_log1mexp

    from recipe_runner.data.batches import collate_pairs

    for scope in ("sequence", "response"):
        t = trainer("tiny-orpo.yaml", tmp_path / scope, cache, *SMALL, f"model_alignment_strategy.orpo.nll_scope={scope}")
        with contextlib.redirect_stdout(io.StringIO()):
            t.setup()
        ex = t.train_ex[3]
        with torch.no_grad():
            out = t.pair_metrics([ex], "train")
            b = collate_pairs([ex], pad_id=t.pad_id, pad_to=None)
            logits = t.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        means = ORPOTrainer.get_batch_logps(logits, b["labels"], average_log_prob=True)
        lc, lr = means[0], means[1]
        if scope == "sequence":
            full = torch.where(b["attention_mask"][:1] == 1, b["input_ids"][:1], -100)
            nll = F.cross_entropy(logits[0, :-1], full[0, 1:], ignore_index=-100)
        else:
            nll = -lc
        odds = (lc - lr) - (trl_log1mexp(lc) - trl_log1mexp(lr))
        beta = t.r.alignment.beta
        assert out["nll_loss"].item() == pytest.approx(nll.item(), abs=1e-5, rel=1e-5), scope
        assert out["log_odds_chosen"].item() == pytest.approx(odds.item(), abs=1e-5, rel=1e-4), scope
        assert out["loss"].item() == pytest.approx((nll - beta * F.logsigmoid(odds)).item(), abs=1e-5, rel=1e-5)


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
    env = dict(os.environ, RECIPE_RUNNER_GIT_COMMIT=COMMIT)
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
