"""Prefix sharing: [prompt | chosen | rejected] in one row gives the unshared numbers."""

from __future__ import annotations

import pytest

from recipe_runner.data.packing import CHOSEN, REJECTED, SHARED, pack_pairs, shared_prefix_length
from recipe_runner.model.attention import block_causal_mask
from test_packing import PAD, check_same, make_examples, random_model  # same helpers, one definition


def test_shared_length_stops_before_the_last_prompt_token():
    e = {"chosen_input_ids": [5, 6, 7, 8, 9], "chosen_labels": [-100, -100, -100, 8, 9],
         "rejected_input_ids": [5, 6, 7, 4], "rejected_labels": [-100, -100, -100, 4]}
    assert shared_prefix_length(e) == 2
    # BPE merge at the boundary: the prompts differ in their last token -> share only the common part
    e2 = dict(e, rejected_input_ids=[5, 6, 3, 4], rejected_labels=[-100, -100, -100, 4])
    assert shared_prefix_length(e2) == 2
    e3 = dict(e, rejected_input_ids=[5, 3, 3, 4])
    assert shared_prefix_length(e3) == 1
    e4 = dict(e, rejected_input_ids=[1, 3, 3, 4])
    assert shared_prefix_length(e4) == 0


def test_layout_prompt_once_rejected_positions_restart():
    e = {"id": 0, "chosen_input_ids": [5, 6, 7, 8, 9], "chosen_labels": [-100, -100, -100, 8, 9],
         "rejected_input_ids": [5, 6, 7, 4], "rejected_labels": [-100, -100, -100, 4]}
    b = pack_pairs([e], pad_id=PAD, width=16, share_prefix=True)
    assert b["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 7, 4]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert b["branch"][0].tolist() == [SHARED] * 2 + [CHOSEN] * 3 + [REJECTED] * 2
    assert b["labels"][0].tolist() == [-100, -100, -100, 8, 9, -100, 4]
    assert b["segments"][0].tolist() == [0, 0, 0, 0, 0, 1, 1]
    m = block_causal_mask(b["doc"], b["branch"])[0, 0]
    rejected_rows = m[5:]
    assert rejected_rows[:, 2:5].sum() == 0  # rejected never sees chosen
    assert rejected_rows[:, :2].all()  # but sees the shared prompt
    assert m[2:5, :2].all()  # chosen sees the prompt too


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("algorithm", ["dpo", "orpo"])
def test_shared_equals_unshared(attn, algorithm):
    model = random_model(attn)
    ex = make_examples(5, 97, seed=7, max_len=40, merge_every=2)
    batch = check_same(model, ex, share_prefix=True, width=64, algorithm=algorithm)
    unshared = pack_pairs(ex, pad_id=PAD, width=64, share_prefix=False)
    assert batch["attention_mask"].sum() < unshared["attention_mask"].sum()  # prompts computed once


def test_shared_static_shapes_and_fallback_when_a_pair_does_not_fit():
    model = random_model("sdpa")
    ex = make_examples(4, 97, seed=8, max_len=40)
    width = max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in ex)
    # at this width some pairs cannot share (prompt + both answers too long): they go as two sequences
    batch = check_same(model, ex, share_prefix=True, width=width, static=True)
    docs = batch["doc"][batch["doc"] >= 0].unique().numel()
    assert len(ex) < docs < 2 * len(ex), "expected some pairs shared and some split"
    assert tuple(batch["input_ids"].shape) == (8, width)


def test_sharing_without_packing_keeps_one_pair_per_row():
    ex = make_examples(4, 97, seed=9, max_len=30)
    ex[1] = dict(ex[1], rejected_input_ids=[50] + ex[1]["rejected_input_ids"][1:])  # nothing in common
    batch = pack_pairs(ex, pad_id=PAD, width=60, share_prefix=True, pack=False)
    assert batch["input_ids"].shape[0] == 4
    for r in range(4):
        segs = batch["segments"][r][batch["labels"][r] != -100].unique().tolist()
        assert segs == [r, r + 4]
