"""Collate tokenized preference pairs into one [2B, T] batch: chosen rows, then rejected rows.

Chosen and rejected go through the model in a single forward (as NxDT does), so rows 0..B-1 are
the chosen sequences and rows B..2B-1 the rejected ones, in the same pair order.

Padding is on the right. `pad_to=seq_length` gives every batch the same shape, which XLA/Neuron
needs to avoid recompiling a graph per shape (`runner.data.padding: static`); `pad_to=None` pads
to the longest row of the batch (`dynamic`), which is faster on CPU/GPU. `pad_multiple` rounds
the dynamic length up, so a compiler sees a handful of shapes instead of one per length.
"""

from __future__ import annotations

import functools

import torch

from recipe_runner.data.tokenize import IGNORE_INDEX


def collate_pairs(
    examples: list[dict], *, pad_id: int, pad_to: int | None, pad_multiple: int = 1
) -> dict[str, torch.Tensor]:
    """input_ids / labels / attention_mask [2B, T] and ids [B] (LongTensors; mask is 1 on real tokens)."""
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    seqs = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
    labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
    longest = max(len(s) for s in seqs)
    if pad_to is None:
        width = -(-longest // pad_multiple) * pad_multiple
    else:
        if longest > pad_to:
            raise ValueError(f"a sequence of {longest} tokens does not fit pad_to={pad_to}; "
                             "tokenize with seq_length <= pad_to")
        width = pad_to
    rows = len(seqs)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    label_ids = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i, (seq, lab) in enumerate(zip(seqs, labels)):
        n = len(seq)
        if len(lab) != n:
            raise ValueError(f"row {i}: {n} input ids but {len(lab)} labels")
        input_ids[i, :n] = torch.as_tensor(seq, dtype=torch.long)
        label_ids[i, :n] = torch.as_tensor(lab, dtype=torch.long)
        mask[i, :n] = 1
    ids = torch.tensor([int(e["id"]) for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "labels": label_ids, "attention_mask": mask, "ids": ids}


@functools.lru_cache(maxsize=2)  # one permutation per epoch, not one per step
def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> tuple[int, ...]:
    """The order of the n training pairs in an epoch: a seeded permutation (a function of seed
    and epoch alone, so a resumed run takes the same pairs at the same step)."""
    if not shuffle:
        return tuple(range(n))
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def limit_batches(examples: list, limit: float | int, batch_pairs: int) -> list:
    """The pairs `trainer.limit_val_batches` allows (Lightning's meaning): a float below 1 is a
    fraction (at least one pair), an int >= 1 that many batches of `batch_pairs` (micro-batch x
    data-parallel ranks), anything else (1.0) all of them. 0 never gets here: it skips loading."""
    if isinstance(limit, float) and limit < 1.0:
        return examples[: max(1, int(len(examples) * limit))]
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
        return examples[: limit * batch_pairs]
    return examples
