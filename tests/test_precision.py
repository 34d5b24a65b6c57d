"""Which dtype computes and which dtype stores the weights, per device and recipe precision."""

from __future__ import annotations

import contextlib

import pytest
import torch

from recipe_runner.train.precision import make_autocast, param_dtype


@pytest.mark.parametrize("precision", ["fp32", "mixed_precision", "autocast", "bf16SR", "manual"])
def test_cpu_always_trains_in_fp32(precision):
    assert param_dtype("cpu", precision) is torch.float32
    assert make_autocast("cpu", precision) is contextlib.nullcontext


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # built here without a GPU, only inspected
def test_cuda_mixed_precision_is_bf16_autocast_over_fp32_weights():
    assert param_dtype("cuda", "mixed_precision") is torch.float32
    ctx = make_autocast("cuda", "mixed_precision")()
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype is torch.bfloat16


@pytest.mark.parametrize("device", ["cuda", "xla"])
def test_bf16sr_keeps_weights_in_bf16_without_autocast(device):
    assert param_dtype(device, "bf16SR") is torch.bfloat16
    assert make_autocast("cuda", "bf16SR") is contextlib.nullcontext
    assert param_dtype(device, "fp32") is torch.float32
