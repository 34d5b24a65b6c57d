"""The optimizer named by a recipe's `model.optim.name`, with NxDT's weight-decay grouping.

Precision: torch keeps the optimizer state (exp_avg, exp_avg_sq) in the parameters' dtype. By
default the training loop's parameters are fp32 (bf16 compute under autocast), so the state is
fp32 -- what NxDT's `adamw_fp32OptState` exists to guarantee when its parameters are bf16. With
`precision.type: bf16SR` on an accelerator the parameters, and so the state, are bf16 (see
train/precision.py param_dtype).

On CUDA the fused kernel runs the update (as transformers' default `adamw_torch_fused`): the
foreach path would hold temporaries the size of the state, ~15 GiB more peak for an 8B model.
"""

from __future__ import annotations

import math

import torch

OPTIMIZERS: tuple[str, ...] = ("adamw_fp32OptState", "adamw", "adam")
# Adam eps when the recipe gives none: NxDT's AdamW_FP32OptimParams defaults to 1e-6, NeMo's
# adam/adamw configs (torch.optim.Adam/AdamW) to 1e-8.
DEFAULT_EPS = {"adamw_fp32OptState": 1e-6, "adamw": 1e-8, "adam": 1e-8}


def is_norm(module: torch.nn.Module) -> bool:
    """Normalization layers, by type: torch's LayerNorm/GroupNorm and any *RMSNorm/*LayerNorm
    class (LlamaRMSNorm, torch.nn.RMSNorm, fused variants), whatever the attribute is called."""
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
        return True
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def param_groups(model: torch.nn.Module, weight_decay: float, exclude_norm_weights: bool = True) -> list[dict]:
    """[decayed, not decayed] parameter groups (empty ones dropped), trainable parameters only.

    Biases are never decayed; norm parameters are not decayed when `exclude_norm_weights`
    (NxDT's `do_layer_norm_weight_decay: True`, which despite its name EXCLUDES them). NxDT
    matches these by name substrings ("bias", "norm", "LayerNorm"); we match by module type.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        norm = exclude_norm_weights and is_norm(module)
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue  # tied weights are listed once
            seen.add(id(p))
            (no_decay if norm or attr == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class NxdtAdamW(torch.optim.AdamW):
    """torch AdamW with the eps placement of NxDT's AdamW_FP32OptimParams (the transformers-style
    AdamW): eps is added to sqrt(v) BEFORE bias correction, i.e. torch's eps at step t is
    eps / sqrt(1 - beta2**t) -- 31.6x larger at step 1 with beta2 0.999. That matters for large
    models, where per-element gradients (~1e-5) are comparable to it.

    Remaining difference: NxDT decays weights after the Adam update, torch before; the results
    differ by lr**2 * weight_decay * update, far below fp32 resolution at fine-tuning lrs.
    The step count lives in each param group ("nxdt_step"), so it is saved and resumed with the
    optimizer's state_dict. Not for capturable=True graphs (eps changes every step).
    """

    def step(self, closure=None):
        for group in self.param_groups:
            group.setdefault("nxdt_eps", group["eps"])
            group["nxdt_step"] = group.get("nxdt_step", 0) + 1
            group["eps"] = group["nxdt_eps"] / math.sqrt(1.0 - group["betas"][1] ** group["nxdt_step"])
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, *, name: str, lr: float, weight_decay: float,
                    betas=(0.9, 0.999), eps: float | None = None, exclude_norm_weights: bool = True,
                    capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer for recipe `model.optim`: "adamw_fp32OptState" (NxDT: decoupled weight decay,
    eps 1e-6 placed as NxDT does), "adamw" (NeMo: torch.optim.AdamW) or "adam" (NeMo:
    torch.optim.Adam, whose weight decay is L2 added to the gradient, not decoupled).
    `eps=None` takes the default of the named optimizer (DEFAULT_EPS)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; valid names: {', '.join(OPTIMIZERS)}")
    cls = {"adamw_fp32OptState": NxdtAdamW, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[name]
    groups = param_groups(model, weight_decay, exclude_norm_weights)
    eps = DEFAULT_EPS[name] if eps is None else eps
    fused = {"fused": True} if all(p.is_cuda for g in groups for p in g["params"]) and not capturable else {}
    return cls(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, capturable=capturable,
               **fused)
