"""Shared pieces of the engine tests (test_train.py, test_resume.py): recipe overrides for small
CPU runs, metrics readers, and module fixtures (a baked git commit, a shared cache dir)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from recipe_runner.recipe import load_recipe
from recipe_runner.train import checkpoint as ckpt
from recipe_runner.train.loop import Trainer


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
