"""Attention masks and position ids for packed rows (data/packing.py), passed to a HF Llama.

A packed row holds several units (a pair with a shared prompt, or one sequence). Token i may
attend to token j when both belong to the same unit, j <= i, and j is in the shared prompt or in
i's own branch (chosen or rejected). Padding attends only to itself, so no softmax row is empty
(an all-masked row gives NaN, which would leak into gradients through 0 * NaN).

The mask is an explicit 4-D tensor [R, 1, W, W]: transformers uses a 4-D mask as given for the
sdpa and eager attention implementations (bool for sdpa, additive float for eager). Together
with restarting position ids this is exactly the unpacked computation. Other implementations
(flash-attention, flex) take different mask forms and are refused with a clear message.
"""

from __future__ import annotations

import torch

from recipe_runner.errors import UserError
from recipe_runner.model.logprobs import sequence_logprobs

SHARED = 0  # the branch id of a shared prompt in data/packing.py (chosen 1, rejected 2)
MASKABLE = ("sdpa", "eager")


def block_causal_mask(doc: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """Boolean [R, 1, W, W] mask, True where query i (dim 2) may attend to key j (dim 3)."""
    w = doc.shape[-1]
    causal = torch.ones(w, w, dtype=torch.bool, device=doc.device).tril()
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    key_branch, query_branch = branch[:, None, :], branch[:, :, None]
    visible = (key_branch == SHARED) | (key_branch == query_branch)
    allowed = same & visible & causal
    allowed |= torch.eye(w, dtype=torch.bool, device=doc.device)
    return allowed[:, None]


def attention_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def model_mask(model, doc: torch.Tensor, branch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D mask in the form the model's attention implementation takes."""
    impl = attention_implementation(model)
    if impl not in MASKABLE:
        raise UserError(f"runner.data.packing / prefix_sharing need sdpa or eager attention, but the model uses "
                        f"{impl!r}: set the model's attn_implementation to sdpa, or turn packing off")
    allowed = block_causal_mask(doc, branch)
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=doc.device).masked_fill(~allowed, torch.finfo(dtype).min)


def packed_hidden(model, batch: dict[str, torch.Tensor], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Final hidden states [R, W, H] of the model body over packed rows (see data/packing.py)."""
    doc, branch = batch["doc"].to(device), batch["branch"].to(device)
    mask = model_mask(model, doc, branch, dtype)
    out = model.get_decoder()(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                              position_ids=batch["position_ids"].to(device), use_cache=False)
    return out.last_hidden_state


def packed_pair_logprobs(model, batch: dict[str, torch.Tensor], *, device, static_shapes: bool = False,
                         full_chosen: bool = False) -> dict[str, torch.Tensor]:
    """Per-sequence log-prob sums over packed rows, in collate_pairs order (chosen 0..B-1, then
    rejected B..2B-1), and for full_chosen the chosen sequences' prompt+answer sums (ORPO NLL)."""
    hidden = packed_hidden(model, batch, device, dtype=next(model.parameters()).dtype)
    weight = model.get_output_embeddings().weight
    b = int(batch["num_pairs"])
    seg = batch["segments"].to(device)
    sums, counts = sequence_logprobs(hidden, weight, batch["labels"].to(device), static_shapes=static_shapes,
                                     segments=seg, num_segments=2 * b)
    out = {"sums": sums, "counts": counts, "tokens": batch["attention_mask"].sum()}
    if full_chosen:
        fs, fc = sequence_logprobs(hidden, weight, batch["full_labels"].to(device), static_shapes=static_shapes,
                                   segments=seg, num_segments=2 * b)
        out["full_sums"], out["full_counts"] = fs[:b], fc[:b]
    return out
