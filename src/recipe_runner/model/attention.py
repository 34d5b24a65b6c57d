"""Attention masks and position ids for packed rows (data/packing.py), passed to a HF Llama.

A packed row holds several units (a pair with a shared prompt, or one sequence). Token i may
attend to token j when both belong to the same unit, j <= i, and j is in the shared prompt or in
i's own branch (chosen or rejected). Padding attends only to itself, so no softmax row is empty
(an all-masked row gives NaN, which would leak into gradients through 0 * NaN).

For sdpa and eager the mask is an explicit 4-D tensor [R, 1, W, W], which transformers uses as
given (bool for sdpa, additive float for eager): every block of the W x W scores is computed and
then masked. For flex_attention (PyTorch's FlexAttention; the `auto` choice on CUDA)
the same rule becomes a BlockMask, and blocks no query of a tile may see are skipped: a packed row
of 2 x seq_length costs the attention of its sequences, not of the whole row. Together with
restarting position ids each is exactly the unpacked computation. flash-attention takes no such
mask and is refused with a clear message.
"""

from __future__ import annotations

import functools

import torch

from recipe_runner.errors import UserError
from recipe_runner.model.logprobs import sequence_logprobs

SHARED = 0  # the branch id of a shared prompt in data/packing.py (chosen 1, rejected 2)
MASKABLE = ("sdpa", "eager", "flex_attention")


def may_attend(doc_q, doc_k, branch_q, branch_k, q, k):
    """The one rule, elementwise: query q may see key k when both are in the same unit, k <= q,
    and k is in the shared prompt or in q's own branch; padding (doc -1) sees only itself, so no
    softmax row is empty. Works on broadcast tensors (dense mask) and inside a flex mask_mod."""
    same = (doc_q == doc_k) & (doc_k >= 0)
    visible = (branch_k == SHARED) | (branch_k == branch_q)
    return (same & visible & (k <= q)) | (q == k)


def block_causal_mask(doc: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """Boolean [R, 1, W, W] mask, True where query i (dim 2) may attend to key j (dim 3)."""
    pos = torch.arange(doc.shape[-1], device=doc.device)
    allowed = may_attend(doc[:, :, None], doc[:, None, :], branch[:, :, None], branch[:, None, :],
                         pos[:, None], pos[None, :])
    return allowed[:, None]


def flex_block_mask(doc: torch.Tensor, branch: torch.Tensor):
    """The same rule as a FlexAttention BlockMask (tiles nobody may see are skipped). Built
    eagerly: it costs what the dense sdpa mask costs, where a compiled builder would recompile
    for every packed width."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        return may_attend(doc[b, q], doc[b, k], branch[b, q], branch[b, k], q, k)

    rows, width = doc.shape
    return create_block_mask(mask_mod, rows, None, width, width, device=doc.device)


def allowed_keys(mask: torch.Tensor | None, s: int, device) -> torch.Tensor:
    """Boolean where a query may attend, for an attention written by hand (backends/nxd): causal
    without a mask, else model_mask's 4-D form (bool, or additive float with 0 = allowed)."""
    if mask is None:
        return torch.ones(s, s, dtype=torch.bool, device=device).tril()
    return mask if mask.dtype == torch.bool else mask == 0


def attention_implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def choose_attention(requested: str, device: str, block_mask: bool) -> str:
    """`runner.attention`. auto: eager on xla (sdpa reads the mask on the host there);
    flex_attention on CUDA when rows carry a block mask (packing or prefix sharing): sdpa would
    compute every tile of a dense mask, causal ones included, where FlexAttention skips the
    tiles nobody sees (a packed row of 2 x seq_length; the chosen block that rejected never
    reads); sdpa otherwise (transformers' default)."""
    if requested != "auto":
        return requested
    if device == "xla":
        return "eager"
    return "flex_attention" if device == "cuda" and block_mask and _has_flex() else "sdpa"


def _has_flex() -> bool:
    """FlexAttention arrived in torch 2.5; the dependency floor is 2.4."""
    import importlib.util

    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def set_attention(model, impl: str) -> None:
    if attention_implementation(model) == impl:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # transformers 4.x in the Neuron DLC
        model.config._attn_implementation = impl


def model_mask(model, doc: torch.Tensor, branch: torch.Tensor, dtype: torch.dtype):
    """The 4-D mask in the form the model's attention implementation takes."""
    impl = attention_implementation(model)
    if impl not in MASKABLE:
        raise UserError(f"runner.data.packing / prefix_sharing need sdpa, eager or flex_attention, but the model "
                        f"uses {impl!r}: set runner.attention to auto, or turn packing and prefix sharing off")
    if impl == "flex_attention":
        return flex_block_mask(doc, branch)
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
                         full_chosen: bool = False, logprobs=None) -> dict[str, torch.Tensor]:
    """Per-sequence log-prob sums over packed rows, in collate_pairs order (chosen 0..B-1, then
    rejected B..2B-1), and for full_chosen the chosen sequences' prompt+answer sums (ORPO NLL).
    `logprobs(hidden, weight, labels, segments=, num_segments=)` scores them: by default
    model/logprobs.py's function; a tensor-parallel trainer passes its vocab-parallel one."""
    if logprobs is None:
        logprobs = functools.partial(sequence_logprobs, static_shapes=static_shapes)
    hidden = packed_hidden(model, batch, device, dtype=next(model.parameters()).dtype)
    weight = model.get_output_embeddings().weight
    b = int(batch["num_pairs"])
    seg = batch["segments"].to(device)
    sums, counts = logprobs(hidden, weight, batch["labels"].to(device), segments=seg, num_segments=2 * b)
    out = {"sums": sums, "counts": counts, "tokens": batch["attention_mask"].sum().to(device)}
    if full_chosen:
        fs, fc = logprobs(hidden, weight, batch["full_labels"].to(device), segments=seg, num_segments=2 * b)
        out["full_sums"], out["full_counts"] = fs[:b], fc[:b]
    return out
