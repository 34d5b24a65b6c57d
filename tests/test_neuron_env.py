"""Recipe -> Neuron environment, as NxDT's launcher derives it."""

from __future__ import annotations

import os

import pytest

from recipe_runner.backends.neuron_env import apply_neuron_env, export_lines, merge_flags, neuron_env
from recipe_runner.recipe import load_recipe

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
DPO_8B = os.path.join(RECIPES, "llama3-8b-dpo.yaml")


def env_for(*overrides, base=""):
    return neuron_env(load_recipe(DPO_8B, list(overrides)), base_flags=base)


def test_tutorial_recipe_gives_the_tutorial_environment():
    env = env_for()
    assert env["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"] == "5"
    assert env["NEURON_RT_EXEC_TIMEOUT"] == "100"
    assert env["BUCKET_CAP_MB"] == "1024"
    assert env["NEURON_FUSE_SOFTMAX"] == "1"
    assert env["XLA_DISABLE_FUNCTIONALIZATION"] == "0"
    assert env["MALLOC_ARENA_MAX"] == "128"
    assert env["NEURON_COMPILE_CACHE_URL"] == "/shared/neuron_cache"
    flags = env["NEURON_CC_FLAGS"].split()
    assert flags[:2] == ["--model-type", "transformer"]
    assert "--cache_dir=/shared/neuron_cache" in flags and "--enable-mixed-precision-accumulation" in flags
    assert env["XLA_USE_BF16"] == env["XLA_DOWNCAST_BF16"] == "0"  # bf16 via autocast, not the deprecated flags
    assert not any(k.startswith("FI_") for k in env)  # one node: no EFA
    assert all(isinstance(v, str) for v in env.values())


@pytest.mark.parametrize("ptype,sr,flag", [("fp32", "0", "--auto-cast none"), ("bf16SR", "1", "--enable-mixed-precision-accumulation"),
                                           ("mixed_precisionSR", "1", "--enable-mixed-precision-accumulation"),
                                           ("autocast", "0", "--auto-cast none")])
def test_precision_types(ptype, sr, flag):
    env = env_for(f"precision.type={ptype}")
    assert env["NEURON_RT_STOCHASTIC_ROUNDING_EN"] == sr
    assert flag in env["NEURON_CC_FLAGS"]


def test_manual_precision_passes_the_recipe_values_through():
    env = env_for("precision.type=manual", "precision.xla_downcast_bf16=1", "precision.neuron_rt_stochastic_rounding_en=1")
    assert (env["XLA_USE_BF16"], env["XLA_DOWNCAST_BF16"], env["NEURON_RT_STOCHASTIC_ROUNDING_EN"]) == ("0", "1", "1")


def test_multi_node_adds_efa_and_remote_cache_uses_url_only():
    env = env_for("trainer.num_nodes=2", "compiler_cache_url=s3://bucket/neuron-cache")
    assert (env["FI_PROVIDER"], env["FI_EFA_USE_DEVICE_RDMA"], env["FI_EFA_FORK_SAFE"]) == ("efa", "1", "1")
    assert env["NEURON_COMPILE_CACHE_URL"] == "s3://bucket/neuron-cache"
    assert "--cache_dir" not in env["NEURON_CC_FLAGS"]


def test_other_keys_reach_the_environment():
    env = env_for("aync_exec_max_inflight_requests=7", "neuron_rt_exec_timeout=600", "bucket_size_collectives=512",
                  "neuron_experimental_compress_rg=true", "model.fusions.softmax=false", "compiler_flags=--model-type=transformer -O1")
    assert (env["NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS"], env["NEURON_RT_EXEC_TIMEOUT"], env["BUCKET_CAP_MB"]) == ("7", "600", "512")
    assert env["NEURON_EXPERIMENTAL_COMPRESS_RG"] == "1" and "NEURON_FUSE_SOFTMAX" not in env
    assert env["NEURON_CC_FLAGS"].split()[:2] == ["--model-type=transformer", "-O1"]


def test_flags_merge_keeps_user_flags_and_is_idempotent():
    assert merge_flags("--model-type=cnn", "--model-type transformer -O1") == "--model-type=cnn -O1"
    once = env_for(base="--verbose=35")["NEURON_CC_FLAGS"]
    assert once.startswith("--verbose=35 ")
    assert env_for(base=once)["NEURON_CC_FLAGS"] == once  # train re-applied under compile: unchanged


def test_apply_sets_a_mapping_and_export_lines_quote():
    environ = {"NEURON_CC_FLAGS": "--verbose=35"}
    applied = apply_neuron_env(load_recipe(DPO_8B), environ)
    assert environ["NEURON_RT_EXEC_TIMEOUT"] == "100" and environ["NEURON_CC_FLAGS"].startswith("--verbose=35")
    lines = export_lines(applied)
    assert "export NEURON_CC_FLAGS='--verbose=35 --model-type transformer" in lines
