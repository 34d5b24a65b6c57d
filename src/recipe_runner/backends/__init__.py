"""Device seams. The core is plain PyTorch; a backend only decides where tensors live and how a
step is executed. `auto` prefers an XLA device when torch-xla is installed and a PJRT device is
configured (the Neuron DLC), then a CUDA GPU, then the CPU."""

from __future__ import annotations

import importlib.util
import os

DEVICES = ("auto", "cpu", "cuda", "xla")


def resolve_device(name: str = "auto") -> str:
    if name != "auto":
        return name
    if importlib.util.find_spec("torch_xla") is not None and (
        os.environ.get("PJRT_DEVICE") or os.path.exists("/dev/neuron0")
    ):
        return "xla"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
