"""collate_pairs: [2B, T] layout (chosen rows then rejected), right padding, labels, mask, ids."""

from __future__ import annotations

import pytest
import torch

from recipe_runner.data.batches import collate_pairs, limit_batches

PAD = 9
EXAMPLES = [
    {"id": 7, "chosen_input_ids": [1, 2, 3, 4], "chosen_labels": [-100, -100, 3, 4],
     "rejected_input_ids": [1, 2, 5], "rejected_labels": [-100, -100, 5]},
    {"id": 3, "chosen_input_ids": [1, 6], "chosen_labels": [-100, 6],
     "rejected_input_ids": [1, 7, 8, 8, 8], "rejected_labels": [-100, 7, 8, 8, 8]},
]


def test_static_padding_to_seq_length():
    b = collate_pairs(EXAMPLES, pad_id=PAD, pad_to=8)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (4, 8)
    assert b["input_ids"].tolist() == [
        [1, 2, 3, 4, PAD, PAD, PAD, PAD],   # chosen 0
        [1, 6, PAD, PAD, PAD, PAD, PAD, PAD],  # chosen 1
        [1, 2, 5, PAD, PAD, PAD, PAD, PAD],  # rejected 0
        [1, 7, 8, 8, 8, PAD, PAD, PAD],      # rejected 1
    ]
    assert b["labels"].tolist()[0] == [-100, -100, 3, 4, -100, -100, -100, -100]
    assert b["labels"].tolist()[3] == [-100, 7, 8, 8, 8, -100, -100, -100]
    assert b["attention_mask"].sum(1).tolist() == [4, 2, 3, 5]
    assert b["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0, 0, 0]
    assert b["ids"].tolist() == [7, 3]
    assert all(t.dtype == torch.long for t in b.values())


def test_dynamic_padding_to_longest_row():
    b = collate_pairs(EXAMPLES, pad_id=PAD, pad_to=None)
    assert b["input_ids"].shape == (4, 5)
    assert b["input_ids"][1].tolist() == [1, 6, PAD, PAD, PAD]
    assert b["labels"][1].tolist() == [-100, 6, -100, -100, -100]
    assert b["attention_mask"][3].tolist() == [1, 1, 1, 1, 1]


def test_dynamic_padding_rounds_up_to_a_multiple():
    assert collate_pairs(EXAMPLES, pad_id=PAD, pad_to=None, pad_multiple=4)["input_ids"].shape == (4, 8)


def test_row_longer_than_pad_to_is_an_error():
    with pytest.raises(ValueError, match="pad_to=4"):
        collate_pairs(EXAMPLES, pad_id=PAD, pad_to=4)


def test_limit_val_batches_fraction_count_or_all():
    pairs = list(range(10))
    assert limit_batches(pairs, 0.25, batch_pairs=4) == [0, 1]  # int(10 * 0.25)
    assert limit_batches(pairs, 0.01, batch_pairs=4) == [0]  # a fraction keeps at least one pair
    assert limit_batches(pairs, 2, batch_pairs=4) == list(range(8))  # two batches of micro-batch x ranks
    assert limit_batches(pairs, 5, batch_pairs=4) == pairs  # more batches than there are: all
    assert limit_batches(pairs, 1.0, batch_pairs=4) == pairs
    assert limit_batches(pairs, True, batch_pairs=4) == pairs  # a YAML boolean is not a count
