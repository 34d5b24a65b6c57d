"""`recipe-runner compile`: the neuron_parallel_compile run it makes, the cache marker that makes
re-runs instant, and the dry path off Neuron. The compiler itself is faked (Trn1-only)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from recipe_runner.backends import compile as comp
from recipe_runner.cli import main
from recipe_runner.errors import UserError
from recipe_runner.recipe import load_recipe

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
DPO_8B = os.path.join(RECIPES, "llama3-8b-dpo.yaml")
TINY = os.path.join(RECIPES, "tiny-dpo.yaml")


@pytest.fixture
def fake_neuron(monkeypatch):
    calls = []

    def fake_run(cmd, env=None, **kw):
        calls.append((cmd, env))
        return subprocess.CompletedProcess(cmd, fake_run.rc)

    fake_run.rc = 0
    monkeypatch.setattr(comp, "on_neuron", lambda: True)
    monkeypatch.setattr(comp.subprocess, "run", fake_run)
    return calls, fake_run


def test_off_neuron_prints_the_plan_and_exits_0(capsys, monkeypatch):
    monkeypatch.setattr(comp, "on_neuron", lambda: False)
    assert main(["compile", DPO_8B, "trainer.max_steps=50"]) == 0
    out = capsys.readouterr().out
    assert "no Neuron compiler here" in out and "neuron_parallel_compile" in out
    assert "torch.distributed.run --nproc_per_node 32" in out
    for o in ("trainer.max_steps=3", "exp_manager.create_checkpoint_callback=false",
              "exp_manager.create_tensorboard_logger=false", "exp_manager.explicit_log_dir=", "runner.device=xla"):
        assert o in out
    assert "NEURON_RT_EXEC_TIMEOUT=100" in out and "/shared/neuron_cache/recipe-runner/" in out


def test_compiles_once_then_skips_via_marker(tmp_path, fake_neuron, capsys):
    calls, _ = fake_neuron
    args = [TINY, f"compiler_cache_url={tmp_path}", "data.seq_length=192"]
    assert main(["compile", *args]) == 0
    assert len(calls) == 1
    cmd, env = calls[0]
    assert cmd[0] == "neuron_parallel_compile" and cmd[cmd.index("-m") + 1] == "recipe_runner.cli"
    assert "train" in cmd and "data.seq_length=192" in cmd and "trainer.max_steps=3" in cmd
    log_dir = next(c.split("=", 1)[1] for c in cmd if c.startswith("exp_manager.explicit_log_dir="))
    assert f"runner.cache_dir={log_dir}/cache" in cmd  # fake reference log-probs never reach the real cache
    assert not os.path.exists(log_dir)  # cleaned up
    assert env["COMPILE"] == "1" and f"--cache_dir={tmp_path}" in env["NEURON_CC_FLAGS"]
    markers = list((tmp_path / "recipe-runner").glob("*.json"))
    assert len(markers) == 1 and json.loads(markers[0].read_text())["shape"]["seq_length"] == 192

    assert main(["compile", *args, "model.optim.lr=1e-5"]) == 0  # lr shapes no graph: cache hit
    assert len(calls) == 1 and "nothing to compile" in capsys.readouterr().out
    assert main(["compile", *args, "--force"]) == 0
    assert len(calls) == 2
    assert main(["compile", TINY, f"compiler_cache_url={tmp_path}", "data.seq_length=160"]) == 0  # new shape
    assert len(calls) == 3


def test_failed_compile_leaves_no_marker(tmp_path, fake_neuron):
    _, fake_run = fake_neuron
    fake_run.rc = 70
    args = comp.argparse.Namespace(recipe=TINY, overrides=[f"compiler_cache_url={tmp_path}"], steps=3, force=False,
                                   dry_run=False, print_env=False)
    with pytest.raises(UserError, match="neuron_parallel_compile exited with 70") as e:
        comp.run(args)
    assert e.value.exit_code == 70
    assert not (tmp_path / "recipe-runner").exists()


def test_key_depends_on_shapes_and_compiler_not_on_rates():
    base = load_recipe(TINY)
    tools = {"neuronx-cc": "2.21.0", "torch-xla": "2.9.0"}
    k = comp.compile_key(base, tools)
    assert comp.compile_key(load_recipe(TINY, ["model.optim.lr=1e-6", "trainer.max_steps=9"]), tools) == k
    assert comp.compile_key(load_recipe(TINY, ["data.micro_batch_size=4"]), tools) != k
    assert comp.compile_key(load_recipe(TINY, ["precision.type=mixed_precision"]), tools) != k
    assert comp.compile_key(base, {**tools, "neuronx-cc": "2.22.0"}) != k


def test_print_env_and_argument_errors(capsys):
    assert main(["compile", DPO_8B, "--print-env"]) == 0
    out = capsys.readouterr().out
    assert "export NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS=5" in out and "export MALLOC_ARENA_MAX=128" in out
    assert main(["compile", "trainer.max_steps=3"]) == 2
    assert main(["compile", TINY, "--steps", "0"]) == 2


def test_single_device_runs_without_torchrun():
    cmd = comp.train_command(TINY, [], load_recipe(TINY), steps=2, log_dir="/x")
    assert "torch.distributed.run" not in cmd and cmd[1:4] == ["-m", "recipe_runner.cli", "train"]
    assert "data.dev_choose_samples=32" in cmd  # global batch 16 x 2 steps: precompute stays short
