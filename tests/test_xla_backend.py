"""The xla backend on torch-xla's CPU PJRT device (`make test-xla`, .venv-xla): the tiny recipes
train to the same metrics as the cpu backend, with a bounded set of graphs, no recompilation
after warm-up, no CPU fallbacks and no host synchronisation inside a training step.

Graph budget of a whole tiny run (DPO, precompute, validation, fp32), measured on torch-xla 2.9:
  precompute forward 1, micro-step forward+backward 2 (first ever, while gradients are not yet
  allocated, then the steady one), optimizer step 2 (first, creating AdamW state, then steady),
  validation forward 1, plus small host-side helpers (parameter norm at log boundaries, metric
  and weight transfers). MAX_GRAPHS bounds the total; NxDT's compile log for the 8B recipe shows
  32 graphs.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

os.environ.setdefault("PJRT_DEVICE", "CPU")
try:
    import torch_xla  # noqa: F401
    import torch_xla.debug.metrics as met
except ImportError as e:  # the main venv: these run in .venv-xla (`make test-xla`)
    print(f"\ntest_xla_backend: skipped, torch_xla is not importable ({e}); run `make test-xla`", file=sys.stderr)
    pytest.skip(f"torch_xla not importable ({e}); run `make test-xla`", allow_module_level=True)

# the autograd engine sizes its device queues at the first backward: create the XLA device before
# the cpu reference run does one (pytorch/xla#4174)
torch_xla.device()

from recipe_runner.backends.xla import XlaTrainer, pad_to_multiple  # noqa: E402
from recipe_runner.recipe import load_recipe  # noqa: E402
from recipe_runner.train.loop import Trainer  # noqa: E402

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
MAX_GRAPHS = 12
STEPS = 6


def overrides(run_dir, device, algo="dpo", precision="fp32"):
    return [f"runner.device={device}", "runner.data.padding=static", f"trainer.max_steps={STEPS}",
            "trainer.log_every_n_steps=2", "trainer.val_check_interval=3", "trainer.limit_val_batches=0.3",
            "data.dev_choose_samples=60", f"precision.type={precision}", f"exp_manager.explicit_log_dir={run_dir}",
            "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
            "model.optim.sched.warmup_steps=2"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class Probe(XlaTrainer):
    """Records compilations, CPU fallbacks and scalar reads made inside each train_step, and the
    real pairs of each packed forward."""

    def _pack(self, examples):
        self.pairs_seen.append(sum(not e.get("padding") for e in examples))
        return super()._pack(examples)

    def train_step(self, step):
        compiles = met.metric_data("CompileTime")[0] if met.metric_data("CompileTime") else 0
        counters = {n: met.counter_value(n) for n in met.counter_names()}
        vals = super().train_step(step)
        after = met.metric_data("CompileTime")[0]
        new_counters = {n: met.counter_value(n) - counters.get(n, 0) for n in met.counter_names()}
        self.per_step.append((after - compiles, {n: d for n, d in new_counters.items() if n.startswith("aten::") and d}))
        return vals


PACKED = ["runner.data.packing=true", "runner.data.prefix_sharing=true"]


@pytest.mark.parametrize("algo,layout", [("dpo", []), ("orpo", []), ("dpo", PACKED), ("orpo", PACKED)],
                         ids=["dpo", "orpo", "dpo-packed-shared", "orpo-packed-shared"])
def test_xla_matches_cpu_with_bounded_graphs(tmp_path, algo, layout):
    """Packed: micro_batch_size rows of 2 x seq_length and a fixed number of pair slots per
    forward (unused slots weigh 0), so one graph serves every forward whatever the lengths."""
    recipe_file = os.path.join(RECIPES, f"tiny-{algo}.yaml")
    cpu_dir, xla_dir = tmp_path / "cpu", tmp_path / "xla"
    Trainer(load_recipe(recipe_file, overrides(cpu_dir, "cpu", algo) + layout), "cpu").run()

    met.clear_all()
    probe = Probe(load_recipe(recipe_file, overrides(xla_dir, "xla", algo) + layout))
    probe.per_step = []
    probe.pairs_seen = []
    probe.run()
    total_graphs = met.metric_data("CompileTime")[0]
    print(f"\n{algo} {layout}: graphs compiled for the whole run: {total_graphs}; "
          f"per train step: {[c for c, _ in probe.per_step]}; pairs per forward: {probe.pairs_seen}")
    if layout:  # it packed: fewer forwards than unpacked micro-batches, several pairs in each
        assert max(probe.pairs_seen) > probe.mbs

    cpu, xla = read_metrics(cpu_dir), read_metrics(xla_dir)
    assert [r["step"] for r in cpu] == [r["step"] for r in xla]
    for a, b in zip(cpu, xla):
        for k, v in a.items():
            if isinstance(v, float) and not k.startswith(("throughput", "tokens_per_s", "elapsed", "eta", "time")):
                assert b[k] == pytest.approx(v, rel=2e-3, abs=2e-4), (a["step"], k)
    assert any("val_loss" in r for r in xla) and any("reduced_train_loss" in r for r in xla)

    # no recompilation once warm (steps 1-2 create gradient buffers and optimizer state)
    assert all(c == 0 for c, _ in probe.per_step[2:]), probe.per_step
    # no CPU fallbacks and no .item()/float() on device tensors inside a step
    assert all(not fallbacks for _, fallbacks in probe.per_step), probe.per_step
    assert 0 < total_graphs <= MAX_GRAPHS


def test_pad_to_multiple_weights_repeats_zero():
    ex = [{"id": i} for i in range(5)]
    padded, w = pad_to_multiple(ex, 4)
    assert [e["id"] for e in padded] == [0, 1, 2, 3, 4, 4, 4, 4] and w == [1] * 5 + [0] * 3
    padded, w = pad_to_multiple(ex, 4, count=12)
    assert len(padded) == 12 and sum(w) == 5
    assert pad_to_multiple([], 4) == ([], [])
