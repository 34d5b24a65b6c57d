"""Reference log-probs for DPO, keyed by sample id.

Precompute (`precompute_ref_log_probs: true`): one no-grad pass of the starting model over every
example before training. Results live in a table indexed by the example's stable id, so they stay
attached to the right pair whatever the shuffling or data-parallel sharding (NxDT attaches them
in row order and can mismatch). Each rank scores ids where `position % world == rank`; the
ranks' tables are summed (all other entries are zero), so every rank ends with the full table.
The table is cached on disk, keyed by model + data + tokenization, and reused on restart.

Without precompute a frozen copy of the starting model scores each micro-batch as it comes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from recipe_runner.data.batches import collate_pairs
from recipe_runner.model.logprobs import model_logprobs
from recipe_runner.train.distributed import Dist, all_reduce_sum


def pair_logprobs(model, examples: list[dict], *, device, pad_id: int, pad_to: int | None, autocast,
                  static_shapes: bool = False, score=model_logprobs) -> dict[str, torch.Tensor]:
    """Summed log-probs and response lengths of chosen and rejected for a micro-batch.
    `score(model, input_ids, attention_mask, labels, static_shapes=)` is the scoring function
    (the backend's: tensor parallelism scores vocab-parallel)."""
    batch = collate_pairs(examples, pad_id=pad_id, pad_to=pad_to)
    with autocast():
        sums, counts = score(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                      batch["labels"].to(device), static_shapes=static_shapes)
    b = len(examples)
    return {"chosen": sums[:b], "rejected": sums[b:], "chosen_len": counts[:b].float(),
            "rejected_len": counts[b:].float(), "tokens": batch["attention_mask"].sum().item()}


@torch.no_grad()
def precompute(model, examples: list[dict], *, batch_size: int, device, pad_id: int, pad_to: int | None,
               autocast, dist: Dist, cache_file: str | None, log=print, static_shapes: bool = False,
               score=model_logprobs) -> torch.Tensor:
    """Table [max_id + 1, 2] of (chosen, rejected) reference log-prob sums, NaN where no example."""
    have = torch.tensor([1.0 if cache_file and os.path.exists(cache_file) else 0.0])
    # all ranks must agree, or one loads the cache while the others wait in the all-reduce below
    # forever (a node whose cache_dir is not the shared one)
    if all_reduce_sum(have, dist).item() == dist.world:
        log(f"reference log-probs: reusing {cache_file}")
        return load_file(cache_file)["logps"]
    size = max(e["id"] for e in examples) + 1 if examples else 0
    table = torch.zeros(size, 2, dtype=torch.float64)
    filled = torch.zeros(size, dtype=torch.float64)
    mine = examples[dist.rank::dist.world]
    was_training = model.training
    model.eval()
    log(f"reference log-probs: scoring {len(examples)} pairs with the starting model")
    for s in range(0, len(mine), batch_size):
        chunk = mine[s:s + batch_size]
        if static_shapes:  # one shape for XLA: repeat the last pair (same id, same value written twice)
            chunk = chunk + chunk[-1:] * (batch_size - len(chunk))
        out = pair_logprobs(model, chunk, device=device, pad_id=pad_id, pad_to=pad_to, autocast=autocast,
                            static_shapes=static_shapes, score=score)
        ids = torch.tensor([e["id"] for e in chunk])
        table[ids, 0] = out["chosen"].double().cpu()
        table[ids, 1] = out["rejected"].double().cpu()
        filled[ids] = 1
    model.train(was_training)
    all_reduce_sum(table, dist)
    all_reduce_sum(filled, dist)
    table[filled == 0] = float("nan")
    table = table.float()
    if cache_file and dist.is_main:
        Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{cache_file}.tmp-{os.getpid()}"
        save_file({"logps": table}, tmp)
        os.replace(tmp, cache_file)
    return table


def lookup(table: torch.Tensor, ids: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) reference sums for these sample ids."""
    rows = table[torch.tensor(ids)]
    if torch.isnan(rows).any():
        raise RuntimeError("reference log-probs missing for some sample ids (stale cache?)")
    return rows[:, 0].to(device), rows[:, 1].to(device)
