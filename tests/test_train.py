"""The training engine end to end on the embedded tiny assets (CPU): the recipes learn, the
first step is ln 2, metrics/TensorBoard/provenance/export are complete. Invariants (accumulation,
resume, reference attachment) are in test_resume.py; shared helpers in train_support.py."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from recipe_runner.recipe import load_recipe
from recipe_runner.train import checkpoint as ckpt

from train_support import _baked_commit, cache  # noqa: F401 (module fixtures)
from train_support import (ALLOWED_EXTRA, COMMIT, LN2, ORPO_EXTRA, REPO, SMALL, TRAIN_KEYS,
                           VAL_KEYS, overrides, records, train_records, trainer, val_records)


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
