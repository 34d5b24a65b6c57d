"""Per-sequence log-probabilities: the one function used by the policy, the reference model and
the reference precompute.

Position t of the hidden states scores token t+1 (labels shifted by one); positions whose label
is -100 (prompt, padding) are not scored. Log-probs are computed from the final hidden states and
the LM-head weight in chunks of tokens, each chunk under activation checkpointing when gradients
are needed, so the [sequences, T, vocab] fp32 logits (4.2 GB per Llama-3 pair at T=4096) are never
materialised: only one chunk of [chunk, vocab] exists at a time, forward and backward.
"""

from __future__ import annotations

import torch
from recipe_runner.model.checkpointing import checkpoint

IGNORE_INDEX = -100
# Tokens per chunk. A chunk's forward+backward holds about four [chunk, V] fp32 buffers; at
# V = 128,256 and T = 4096 the naive peak is ~8.0 GiB, chunks of 512 ~1.0 GiB (1/7.7) and of 256
# ~0.53 GiB (1/15): 256 keeps the extra peak under 1/8 (tests/test_chunked_logprobs.py).
CHUNK_SIZE = 256


def _chunk_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) for each row of hidden [n, H] under logits = hidden @ weight.T, in fp32."""
    logits = (hidden @ weight.t()).float()
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                      chunk_size: int = CHUNK_SIZE, static_shapes: bool = False, segments: torch.Tensor | None = None,
                      num_segments: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probs of the labelled tokens of each sequence, and how many there are.

    hidden: [N, T, H] final hidden states (after the last norm); weight: [V, H] LM head;
    labels: [N, T] token ids with -100 where nothing is scored. Returns (sum [N] fp32, count [N]).

    static_shapes=False scores only the labelled positions (a gather whose size depends on the
    data: fastest on cpu/cuda, no work spent on prompt and padding); True scores every position in
    fixed-size chunks along T and masks, so an XLA compiler sees the same shapes every step.

    segments ([N, T], packed rows from data/packing.py): the output index each labelled
    position's log-prob is summed into; the result then has num_segments entries, not N.
    """
    n, t, h = hidden.shape
    hidden, labels = hidden[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)

    def run(hc: torch.Tensor, lc: torch.Tensor) -> torch.Tensor:
        if use_ckpt:
            return checkpoint(_chunk_token_logps, hc, weight, lc, use_reentrant=False)
        return _chunk_token_logps(hc, weight, lc)

    if static_shapes:
        parts = [run(hidden[:, s:s + chunk_size].reshape(-1, h), labels[:, s:s + chunk_size].reshape(-1))
                 .view(n, -1) for s in range(0, t - 1, chunk_size)]
        return per_sequence(torch.cat(parts, dim=1) * mask, mask, segments, num_segments)

    rows = mask.nonzero(as_tuple=True)
    flat_h, flat_l = hidden[rows], labels[rows]
    token_logps = torch.cat([run(flat_h[s:s + chunk_size], flat_l[s:s + chunk_size])
                             for s in range(0, flat_l.numel(), chunk_size)]) if flat_l.numel() else flat_h.new_zeros(0).float()
    if segments is not None:
        seg = segments[:, 1:][rows]
        sums = torch.zeros(num_segments, dtype=torch.float32, device=hidden.device).index_add(0, seg, token_logps)
        return sums, torch.bincount(seg, minlength=num_segments)
    sums = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add(0, rows[0], token_logps)
    return sums, mask.sum(-1)


def per_sequence(token_logps: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None = None,
                 num_segments: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Static-shape sums: [N, T-1] token log-probs (0 where not scored) and their mask -> (sum,
    count) per row, or per output index of `segments` ([N, T], shifted here like the labels)."""
    if segments is None:
        return token_logps.sum(-1), mask.sum(-1)
    seg = segments[:, 1:].reshape(-1)
    sums = torch.zeros(num_segments, dtype=token_logps.dtype, device=token_logps.device)
    counts = torch.zeros(num_segments, dtype=torch.long, device=token_logps.device)
    return sums.index_add(0, seg, token_logps.reshape(-1)), counts.index_add(0, seg, mask.reshape(-1).long())


def model_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                   chunk_size: int = CHUNK_SIZE, static_shapes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a Hugging Face causal LM body and score `labels` with its LM head (see sequence_logprobs)."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    weight = model.get_output_embeddings().weight
    return sequence_logprobs(out.last_hidden_state, weight, labels, chunk_size=chunk_size, static_shapes=static_shapes)
