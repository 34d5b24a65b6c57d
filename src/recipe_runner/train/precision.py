"""What `precision.type` means on each device: the parameter (and so optimizer-state) dtype and
the autocast context the forward runs under."""

from __future__ import annotations

import contextlib

import torch


def make_autocast(device: str, precision: str):
    """fp32 on CPU; bf16 autocast (fp32 weights and optimizer state) where the device has it.
    bf16SR keeps the weights themselves in bf16 (see param_dtype), so no autocast is needed."""
    if device == "cuda" and precision not in ("fp32", "bf16SR"):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def param_dtype(device: str, precision: str) -> torch.dtype:
    """Parameter (and so optimizer-state) dtype. `bf16SR` on an accelerator keeps weights and
    AdamW state in bf16, as NxDT's bf16SR does on Neuron (where the runtime rounds
    stochastically) and as TRL's bf16 runs do on GPUs: half the memory of fp32 master weights,
    which is what lets an 8B model train on one large GPU. The CPU always trains in fp32."""
    return torch.bfloat16 if device != "cpu" and precision == "bf16SR" else torch.float32
