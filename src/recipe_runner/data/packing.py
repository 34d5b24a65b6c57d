"""Packing and prefix sharing: several preference sequences per fixed-width row.

Why: real preference data is short and uneven, so `collate_pairs` rows ([2B, T], chosen then
rejected) are mostly padding, and every prompt runs twice (once before chosen, once before
rejected). Here each pair becomes a *unit* laid out in one row:

    shared prompt (S tokens) | chosen[S:] | rejected[S:]

with position ids 0..S-1, then S.. for chosen and S.. again for rejected. Attention (see
model/attention.py) lets a token see earlier tokens of its own unit that are in the shared part
or in its own branch: rejected sees the prompt and itself, never chosen. The result is exactly
the unshared forward, with the prompt computed once. Without prefix sharing (or when S = 0) a
pair is two units, chosen and rejected, each its own sequence with positions from 0.

Units are placed first-fit, longest first (ties: input order), into rows of `width` tokens; the
layout is a pure function of the examples, so runs are reproducible. Every labelled position
carries `segments`: the output index its log-prob is summed into (pair i's chosen -> i, its
rejected -> B + i, the shared prompt -> i for the ORPO full-sequence NLL), so per-sequence sums
come back in collate_pairs order whatever the layout.

Why the shared part stops one token before the answers: the answer's first token is scored by
the hidden state of the token before it. Ending the shared part at S <= prompt_len - 1 keeps the
prompt's last token inside each branch, so both branches score their first answer token from an
adjacent position, and the label at the start of every block is a prompt token (-100).
"""

from __future__ import annotations

import torch

from recipe_runner.data.tokenize import IGNORE_INDEX

SHARED, CHOSEN, REJECTED = 0, 1, 2
# Static shapes (XLA): a packed forward has micro_batch_size rows and always this many pair slots
# per row, unused slots weighing 0. Slots are cheap (a few numbers each), so the cap is set above
# what real data fills: orca-like pairs (~600 shared tokens) fit ~13 to a row of 2 x 4096.
MAX_PAIRS_PER_ROW = 16


def _prompt_length(labels) -> int:
    """Leading -100 labels: the prompt part of a tokenized sequence."""
    for i, x in enumerate(labels):
        if x != IGNORE_INDEX:
            return i
    return len(labels)


def shared_prefix_length(example: dict) -> int:
    """Tokens of the prompt that chosen and rejected can share (0: nothing to share)."""
    c, r = example["chosen_input_ids"], example["rejected_input_ids"]
    common = 0
    for a, b in zip(c, r):
        if a != b:
            break
        common += 1
    limit = min(_prompt_length(example["chosen_labels"]), _prompt_length(example["rejected_labels"])) - 1
    return max(0, min(common, limit))


def _units(examples: list[dict], width: int, share_prefix: bool, num_pairs: int | None = None) -> list[list[tuple]]:
    """Each unit is a list of blocks (tokens, labels, first position, branch, output index);
    rejected outputs start at num_pairs (default: the number of examples)."""
    b = len(examples) if num_pairs is None else num_pairs
    units = []
    for i, e in enumerate(examples):
        ci, cl, ri, rl = e["chosen_input_ids"], e["chosen_labels"], e["rejected_input_ids"], e["rejected_labels"]
        if max(len(ci), len(ri)) > width:
            raise ValueError(f"a sequence of {max(len(ci), len(ri))} tokens does not fit a packed row of {width}")
        s = shared_prefix_length(e) if share_prefix else 0
        if s > 0 and len(ci) + len(ri) - s <= width:
            units.append([(ci[:s], cl[:s], 0, SHARED, i), (ci[s:], cl[s:], s, CHOSEN, i),
                          (ri[s:], rl[s:], s, REJECTED, b + i)])
        else:
            units.append([(ci, cl, 0, CHOSEN, i)])
            units.append([(ri, rl, 0, REJECTED, b + i)])
    return units


def _unit_len(unit: list[tuple]) -> int:
    return sum(len(block[0]) for block in unit)


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of items per bin: first fit, longest first, ties in input order (deterministic)."""
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    bins: list[list[int]] = []
    room: list[int] = []
    for k in order:
        for j, free in enumerate(room):
            if lengths[k] <= free:
                bins[j].append(k)
                room[j] -= lengths[k]
                break
        else:
            bins.append([k])
            room.append(width - lengths[k])
    return bins


def rows_needed(examples: list[dict], *, width: int, share_prefix: bool) -> int:
    units = _units(examples, width, share_prefix)
    return len(first_fit([_unit_len(u) for u in units], width))


def group_pairs(examples: list[dict], *, max_rows: int, width: int, share_prefix: bool,
                max_pairs: int | None = None) -> list[list[dict]]:
    """Split examples (in order) into forward passes that each pack into at most max_rows rows.

    Pairs are added to the current group while they still fit, so a forward holds as many pairs
    as its rows allow (memory stays that of max_rows x width tokens, the unpacked micro-batch),
    and at most max_pairs of them (static shapes: every forward has the same number of outputs).
    """
    groups: list[list[dict]] = []
    current: list[dict] = []
    for e in examples:
        trial = current + [e]
        full = max_pairs is not None and len(current) >= max_pairs
        if current and (full or rows_needed(trial, width=width, share_prefix=share_prefix) > max_rows):
            groups.append(current)
            trial = [e]
        current = trial
    if current:
        groups.append(current)
    return groups


def pack_pairs(examples: list[dict], *, pad_id: int, width: int, share_prefix: bool, pack: bool = True,
               num_rows: int | None = None, trim: bool = True, num_pairs: int | None = None) -> dict[str, torch.Tensor]:
    """Packed rows for a micro-batch of pairs.

    Returns input_ids, position_ids, labels (response tokens, -100 elsewhere), full_labels (the
    chosen sequence's prompt and answer tokens, for ORPO's sequence-scope NLL), segments (output
    index of each position), doc (unit per position, -1 on padding), branch ([R, W] each),
    attention_mask ([R, W], 1 on real tokens) and the pair count. num_rows pads (or checks) the
    row count, trim=False keeps the full width, num_pairs >= len(examples) fixes the number of
    outputs (pairs past the examples get no tokens, so sums and counts 0): all three give compilers
    one shape. pack=False puts each pair in its own row (prefix sharing without packing).
    """
    if not examples and not num_pairs:
        raise ValueError("pack_pairs needs at least one example")
    num_pairs = len(examples) if num_pairs is None else num_pairs
    if num_pairs < len(examples):
        raise ValueError(f"num_pairs {num_pairs} is fewer than the {len(examples)} examples")
    units = _units(examples, width, share_prefix, num_pairs)
    if pack:
        bins = first_fit([_unit_len(u) for u in units], width)
    else:  # one pair per row (both of its units when it could not share)
        pair_of = [u[0][4] % num_pairs for u in units]
        bins = [[k for k in range(len(units)) if pair_of[k] == i] for i in range(len(examples))]
    rows = len(bins)
    if num_rows is not None:
        if rows > num_rows:
            raise ValueError(f"{len(examples)} pairs need {rows} packed rows, more than {num_rows}")
        rows = num_rows
    used = max((sum(_unit_len(units[k]) for k in b) for b in bins), default=1)
    w = used if trim else width
    t = {k: torch.full((rows, w), v, dtype=torch.long) for k, v in
         (("input_ids", pad_id), ("position_ids", 0), ("labels", IGNORE_INDEX), ("full_labels", IGNORE_INDEX),
          ("segments", 0), ("doc", -1), ("branch", 0), ("attention_mask", 0))}
    for r, members in enumerate(bins):
        col = 0
        for k in sorted(members):  # place a row's units in input order: stable, readable layouts
            for tokens, labels, start, branch, out in units[k]:
                n = len(tokens)
                sl = slice(col, col + n)
                ids = torch.as_tensor(tokens, dtype=torch.long)
                lab = torch.as_tensor(labels, dtype=torch.long)
                lab[:1] = IGNORE_INDEX  # a block's first token has no adjacent predecessor to score it
                pos = torch.arange(start, start + n)
                t["input_ids"][r, sl] = ids
                t["position_ids"][r, sl] = pos
                t["labels"][r, sl] = lab
                if branch != REJECTED:
                    t["full_labels"][r, sl] = torch.where(pos > 0, ids, torch.full_like(ids, IGNORE_INDEX))
                t["segments"][r, sl] = out
                t["doc"][r, sl] = k
                t["branch"][r, sl] = branch
                t["attention_mask"][r, sl] = 1
                col += n
    t["num_pairs"] = torch.tensor(num_pairs)
    return t
