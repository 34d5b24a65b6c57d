"""DPO and ORPO losses as pure functions of per-sequence log-probs.

Formulas: /work/shared/reference/peers.md (TRL) and nxdt.md (NxDT). All functions return
per-pair values; the caller averages over the global batch so that gradient accumulation and
data parallelism give the same numbers as one big batch. Stable forms throughout: logsigmoid
instead of log(sigmoid), log1mexp instead of log(1 - exp) (NxDT uses the unstable ones).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable everywhere (Maechler 2012: branch at -ln 2): near 0 it
    is log(-expm1(x)), far below log1p(-exp(x)). Each branch only sees inputs from its own side,
    so the branch torch.where discards never produces inf/NaN gradients. x is capped at the
    smallest normal magnitude of its dtype: a mean log-prob of exactly 0 (fp32 rounds p ~ 1 to 0)
    would otherwise give -inf, while a cap as large as -1e-7 would be wrong (and have zero
    gradient) for real confident means such as -1e-9."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    cut = -math.log(2)
    near = torch.log(-torch.expm1(torch.clamp(x, min=cut)))
    far = torch.log1p(-torch.exp(torch.clamp(x, max=cut)))
    return torch.where(x > cut, near, far)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-pair DPO loss and rewards from summed log-probs over response tokens.

    sigmoid: -(1-eps) logsigmoid(beta d) - eps logsigmoid(-beta d)   (eps = label_smoothing; NxDT: eps=0)
    hinge:   relu(1 - beta d)
    ipo:     (c/|y_w| - r/|y_l| - 1/(2 beta))^2   (log-ratios normalised by response length)
    with c = pi_c - ref_c, r = pi_r - ref_r, d = c - r. Rewards are beta * c and beta * r, detached.
    """
    c = policy_chosen - ref_chosen
    r = policy_rejected - ref_rejected
    d = c - r
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo needs chosen_lengths and rejected_lengths")
        losses = (c / chosen_lengths - r / rejected_lengths - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: use sigmoid, hinge or ipo")
    return {"loss": losses, "chosen_rewards": (beta * c).detach(), "rejected_rewards": (beta * r).detach()}


def orpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, nll: torch.Tensor, *,
              beta: float) -> dict[str, torch.Tensor]:
    """Per-pair ORPO loss from MEAN per-token log-probs of the responses.

    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr)); loss = nll - beta * logsigmoid(log_odds).
    `nll` is the per-pair negative log-likelihood of the chosen sequence (NxDT: mean over response
    tokens, i.e. -chosen_mean; TRL/paper: over prompt and response tokens) — the caller decides.
    """
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    ratio = F.logsigmoid(log_odds)
    return {
        "loss": nll - beta * ratio,
        "nll_loss": nll.detach(),
        "log_odds_ratio": ratio.detach(),
        "log_odds_chosen": log_odds.detach(),
        "chosen_rewards": (beta * chosen_mean).detach(),
        "rejected_rewards": (beta * rejected_mean).detach(),
    }
