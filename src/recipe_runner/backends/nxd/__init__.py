"""Tensor parallelism on Trainium through neuronx-distributed (NxD), isolated here.

`plan` and `vocab_parallel` are pure and import anywhere (they are what the tests check);
`model` and `trainer` import neuronx_distributed and exist only in the Neuron DLC (PyPI's
`neuronx-distributed` is a placeholder). Nothing outside this package imports NxD.
"""

from __future__ import annotations

import importlib.util

from recipe_runner.errors import UserError


def nxd_available() -> bool:
    return importlib.util.find_spec("neuronx_distributed") is not None


def require_nxd() -> None:
    if not nxd_available():
        raise UserError("distributed_strategy.tensor_model_parallel_size > 1 needs neuronx-distributed, which only the "
                        "AWS Neuron DLC provides: run in that image, or set tensor_model_parallel_size=1")
