"""Sequence log-probs when the LM head is split over tensor-parallel ranks by vocabulary rows.

Each rank holds logits for its slice [start, start + V/T) of the vocabulary only. log p(y) =
logit_y - logsumexp(all logits), computed without ever gathering the [tokens, V] logits:
  1. m   = all-reduce MAX of each rank's row max          (stability shift, no gradient)
  2. S   = all-reduce SUM of sum(exp(local - m))
  3. t   = all-reduce SUM of the target logit, contributed only by the rank owning the target
  log p = t - m - log S
The gradient w.r.t. the local logits is local too: g * (onehot_local - exp(local - m) / S).
The gradient w.r.t. the (replicated) hidden states is a partial sum per rank; the caller passes
the hidden states through NxD's copy_to_tensor_model_parallel_region (identity forward,
all-reduce backward) or, with sequence parallelism, the sequence all-gather, which reduces it.

Collectives are injected (`reduce_max`, `reduce_sum`: in-place on a tensor, return it), so the
same code runs over NxD's tensor-parallel group on Trainium and over simulated ranks in tests.
Masking is multiplicative, never boolean indexing, so shapes are static for the XLA compiler.
"""

from __future__ import annotations

from typing import Callable

import torch
from recipe_runner.model.checkpointing import checkpoint

from recipe_runner.model.logprobs import IGNORE_INDEX, per_sequence

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def local_max(logits: torch.Tensor) -> torch.Tensor:
    return logits.detach().amax(dim=-1)


def local_sum_exp(logits: torch.Tensor, global_max: torch.Tensor) -> torch.Tensor:
    return torch.exp(logits - global_max.unsqueeze(-1)).sum(-1)


def local_target_logit(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(target logit where this rank owns the label else 0, ownership mask as float)."""
    local = labels - vocab_start
    owned = (local >= 0) & (local < logits.shape[-1])
    idx = (local * owned).clamp(min=0)
    picked = logits.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return picked * owned, owned.to(logits.dtype)


def combine(target: torch.Tensor, global_max: torch.Tensor, sum_exp: torch.Tensor) -> torch.Tensor:
    return target - global_max - torch.log(sum_exp)


def local_logit_grad(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, global_max: torch.Tensor,
                     sum_exp: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """d(sum g * log p) / d(local logits) = g * (onehot_local - softmax_local)."""
    soft = torch.exp(logits - global_max.unsqueeze(-1)) / sum_exp.unsqueeze(-1)
    _, owned = local_target_logit(logits, labels, vocab_start)
    local = ((labels - vocab_start) * owned.long()).clamp(min=0)
    onehot = torch.zeros_like(soft).scatter(-1, local.unsqueeze(-1), owned.unsqueeze(-1))
    return grad_out.unsqueeze(-1) * (onehot - soft)


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, reduce_max, reduce_sum):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
        m = reduce_max(local_max(logits).clone())
        s = reduce_sum(local_sum_exp(logits, m))
        t, _ = local_target_logit(logits, labels, vocab_start)
        t = reduce_sum(t.clone())
        ctx.save_for_backward(logits, labels, m, s)
        ctx.vocab_start = vocab_start
        return combine(t, m, s)

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, m, s = ctx.saved_tensors
        return local_logit_grad(logits, labels, ctx.vocab_start, m, s, grad_out), None, None, None, None


def vocab_parallel_token_logps(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, *,
                               reduce_max: Reduce = _identity, reduce_sum: Reduce = _identity) -> torch.Tensor:
    """log p(label) for rows of local logits [n, V/T]; labels hold global ids (>= 0)."""
    return _VocabParallelLogProb.apply(logits, labels, vocab_start, reduce_max, reduce_sum)


def vocab_parallel_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_start: int, *,
                                     reduce_max: Reduce = _identity, reduce_sum: Reduce = _identity,
                                     chunk_size: int = 512, segments: torch.Tensor | None = None,
                                     num_segments: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logprobs (model/logprobs.py, static_shapes=True) for a vocab-split LM head.

    hidden: [N, T, H] (replicated over tp ranks); weight: this rank's [V/T, H] rows starting at
    vocab_start; labels: [N, T] with -100 where nothing is scored. Returns (sum [N] fp32, count [N]),
    identical on every tp rank; with segments (packed rows) one entry per output index instead. Chunks along T, each under activation checkpointing when
    gradients are needed, so only [chunk, V/T] logits exist at a time."""
    n, t, h = hidden.shape
    hidden, labels = hidden[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)

    def chunk_logps(hc: torch.Tensor, lc: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_token_logps(hc @ weight.t(), lc, vocab_start, reduce_max=reduce_max, reduce_sum=reduce_sum)

    parts = []
    for s in range(0, t - 1, chunk_size):
        hc, lc = hidden[:, s:s + chunk_size].reshape(-1, h), safe[:, s:s + chunk_size].reshape(-1)
        out = checkpoint(chunk_logps, hc, lc, use_reentrant=False) if use_ckpt else chunk_logps(hc, lc)
        parts.append(out.view(n, -1))
    return per_sequence(torch.cat(parts, dim=1) * mask, mask, segments, num_segments)
