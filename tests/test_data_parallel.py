"""Data parallelism on CPU (gloo): 2 processes give the numbers of 1 process with 2x accumulation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_packing import PAD, make_examples, random_model

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny-dpo.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _precompute_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import contextlib

    from recipe_runner.train import reference
    from recipe_runner.train.distributed import Dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    scored: list[int] = []
    real = reference.pair_logprobs

    def counting(model, examples, **kw):
        scored.extend(e["id"] for e in examples)
        return real(model, examples, **kw)

    reference.pair_logprobs = counting
    ex = make_examples(7, 97, seed=11, max_len=30)
    table = reference.precompute(random_model(), ex, batch_size=2, device="cpu", pad_id=PAD, pad_to=None,
                                 autocast=contextlib.nullcontext, dist=Dist(rank=rank, world=world), cache_file=None,
                                 log=lambda m: None)
    torch.save({"table": table, "scored": scored}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_reference_logprobs_sharded_once_and_keyed_by_id(tmp_path):
    import contextlib

    from recipe_runner.train import reference
    from recipe_runner.train.distributed import Dist

    ex = make_examples(7, 97, seed=11, max_len=30)
    single = reference.precompute(random_model(), ex, batch_size=2, device="cpu", pad_id=PAD, pad_to=None,
                                  autocast=contextlib.nullcontext, dist=Dist(), cache_file=None, log=lambda m: None)
    mp.spawn(_precompute_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    scored = [r["scored"] for r in results]
    assert sorted(scored[0] + scored[1]) == sorted(e["id"] for e in ex)  # every pair once, on one rank
    assert abs(len(scored[0]) - len(scored[1])) <= 1
    for r in results:  # every rank ends with the full table, rows at the sample ids
        torch.testing.assert_close(r["table"], single, equal_nan=True, atol=1e-5, rtol=1e-6)
    assert torch.isnan(single[:10]).all() and not torch.isnan(single[10:]).any()


def _train(run_dir: Path, *extra: str, procs: int = 1) -> list[dict]:
    common = ["trainer.max_steps=4", "trainer.log_every_n_steps=1", "trainer.val_check_interval=2",
              "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
              "data.dev_choose_samples=32", "trainer.limit_val_batches=0.25", f"exp_manager.explicit_log_dir={run_dir}"]
    if procs == 1:
        cmd = [sys.executable, "-m", "recipe_runner.cli", "train", TINY, *common, *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(_free_port()), "-m", "recipe_runner.cli", "train", TINY,
               f"trainer.devices={procs}", *common, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert ("DistributedDataParallel (gloo)" in res.stdout + res.stderr) == (procs > 1)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("dp") / "one")


@pytest.mark.parametrize("layout", [[], ["runner.data.packing=true", "runner.data.prefix_sharing=true"],
                                    ["data.micro_batch_size=4"]],
                         ids=["rows", "packed-shared", "rows-accumulating"])
def test_two_processes_match_one_with_double_accumulation(tmp_path, layout, one_process):
    # global batch 16, micro-batch 8: one process accumulates 2 micro-batches, each of 2 ranks 1;
    # with micro-batch 4 each rank accumulates 2 too (DDP's no_sync, then one all-reduce)
    one = one_process
    two = _train(tmp_path / "two", *layout, procs=2)
    assert [(m["step"], sorted(m)) for m in one] == [(m["step"], sorted(m)) for m in two]
    timing = {"throughput", "throughput_peak", "tokens_per_s", "elapsed", "eta"}
    for a, b in zip(one, two):
        for key, value in a.items():
            if key in timing or not isinstance(value, float):
                continue
            prefix = "val_" if key.startswith("val_") else ""
            if key.endswith("reward_accuracy") and abs(a[f"{prefix}chosen_rewards"]) + abs(a[f"{prefix}rejected_rewards"]) < 1e-5:
                continue  # policy == reference: every pair is a tie, decided by float rounding of the layout
            assert b[key] == pytest.approx(value, abs=1e-5, rel=1e-5), (a["step"], key)
    assert any("val_loss" in m and m["step"] == 4 for m in two)
    assert two[-1]["val_loss"] < two[0]["val_loss"]  # it trained
