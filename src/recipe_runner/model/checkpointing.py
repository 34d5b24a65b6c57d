"""Activation checkpointing that works on every device the engine runs on.

torch's non-reentrant checkpoint looks up a `torch.xla` device module that torch-xla 2.9 does
not register, so XLA tensors go through torch_xla's reentrant checkpoint (whose optimization
barrier also stops the compiler from merging the recomputation back into the forward); CPU and
CUDA tensors take torch's path. Nothing we checkpoint is random (no dropout), so RNG state is not
preserved on XLA.
"""

from __future__ import annotations

import torch


def checkpoint(fn, *args, use_reentrant: bool = False, **kwargs):
    if any(isinstance(a, torch.Tensor) and a.device.type == "xla" for a in args):
        from torch_xla.utils.checkpoint import checkpoint as xla_checkpoint

        kwargs.pop("preserve_rng_state", None)
        return xla_checkpoint(fn, *args, use_reentrant=True, preserve_rng_state=False, **kwargs)
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    return torch_checkpoint(fn, *args, use_reentrant=use_reentrant, **kwargs)
