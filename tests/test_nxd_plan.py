"""The adapter's tensor-parallel Llama description agrees with what convert-checkpoint writes,
and ranks map to (pp, dp, tp) and rank files as neuronx-distributed places them. Pure: no NxD."""

from __future__ import annotations

import pytest

from recipe_runner.backends.nxd.plan import (checkpoint_file, kv_group_of_heads, layer_plan, param_shapes, rank_coords,
                                             vocab_range)
from recipe_runner.errors import UserError
from recipe_runner.prepare.nxd_layout import LlamaDims, Parallel, llama_dims, nxd_param_shapes, rank_layout

LLAMA3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                 num_hidden_layers=32, vocab_size=128256)
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            num_hidden_layers=3, vocab_size=1024)

CASES = [
    (LLAMA3_8B, dict(tp_size=32, kv_size_multiplier=4)),   # the tutorial's layout
    (LLAMA3_8B, dict(tp_size=32, kv_size_multiplier=4, fuse_qkv=True)),
    (LLAMA3_8B, dict(tp_size=8)),
    (LLAMA3_8B, dict(tp_size=16, kv_size_multiplier=2, pp_size=4)),
    (LLAMA3_8B, dict(tp_size=8, qkv_linear=False)),
    (TINY, dict(tp_size=4, kv_size_multiplier=2)),
    (TINY, dict(tp_size=2, kv_size_multiplier=1, pp_size=2)),
    (TINY, dict(tp_size=2, qkv_linear=False, fuse_qkv=True)),  # heads != kv heads: not fused
    (dict(TINY, num_key_value_heads=4), dict(tp_size=2, qkv_linear=False, fuse_qkv=True)),  # MHA fused
    (dict(TINY, tie_word_embeddings=True), dict(tp_size=2)),
]


@pytest.mark.parametrize("cfg,par", CASES)
def test_param_names_and_shapes_equal_the_converter_layout(cfg, par):
    converter = nxd_param_shapes(cfg, **par)
    d, p = llama_dims(cfg), Parallel(**par)
    for (tp, pp), expected in converter.items():
        mine = param_shapes(layer_plan(d, p, pp))
        assert mine == expected, (tp, pp)
        # same order too: the adapter's state_dict lists tensors as the rank file does
        assert list(mine) == [t.name for t in rank_layout(d, p, tp, pp)]


def test_plan_rejects_what_the_layout_rejects():
    with pytest.raises(UserError, match="kv_size_multiplier"):
        layer_plan(llama_dims(LLAMA3_8B), Parallel(tp_size=32, kv_size_multiplier=1))


def test_local_query_heads_pair_with_the_converter_kv_heads():
    """Rank r of the tutorial layout: q heads 4*(r%8)+r//8 (one per rank), kv head r%8; with
    tp=8 m=1: 4 q heads per rank, all on the rank's single kv head."""
    d = llama_dims(LLAMA3_8B)
    plan = layer_plan(d, Parallel(tp_size=32, kv_size_multiplier=4))
    assert (plan.attention.local_heads, plan.attention.local_kv_heads) == (1, 1)
    assert kv_group_of_heads(plan) == [0]
    for r in (0, 5, 9, 31):
        q = [t for t in rank_layout(d, Parallel(tp_size=32, kv_size_multiplier=4), r, 0)
             if t.name.endswith("weight_q")][0].pieces
        assert q[0].start // 128 == 4 * (r % 8) + r // 8
    plan8 = layer_plan(d, Parallel(tp_size=8))
    assert kv_group_of_heads(plan8) == [0, 0, 0, 0]
    tiny = layer_plan(LlamaDims(64, 8, 4, 8, 128, 2, 1024), Parallel(tp_size=2))
    assert kv_group_of_heads(tiny) == [0, 0, 1, 1]


def test_rank_coords_tp_contiguous_like_nxd():
    # 64 ranks, tp 8, pp 2 -> dp 4; layout [pp, dp, tp]
    seen = {}
    for g in range(64):
        c = rank_coords(g, 64, tp=8, pp=2)
        assert c.tp == g % 8 and c.dp == (g // 8) % 4 and c.pp == g // 32
        seen[(c.pp, c.dp, c.tp)] = g
    assert len(seen) == 64
    assert checkpoint_file(rank_coords(37, 64, tp=8, pp=2)) == "dp_rank_00_tp_rank_05_pp_rank_01.pt"
    with pytest.raises(ValueError):
        rank_coords(0, 30, tp=8)


def test_rank_coords_trn1_tp4_interleaves_within_a_node():
    # NxD's documented example: 2 nodes x 32 cores, TP=4 -> TP groups [0,8,16,24], [1,9,17,25], ...
    groups: dict[tuple[int, int], list[int]] = {}
    for g in range(64):
        c = rank_coords(g, 64, tp=4, local_world=32, trn1=True)
        groups.setdefault((c.pp, c.dp), []).append(g)
        assert c.tp == (g % 32) // 8
    assert groups[(0, 0)] == [0, 8, 16, 24]
    assert groups[(0, 1)] == [1, 9, 17, 25]
    assert groups[(0, 8)] == [32, 40, 48, 56]
    assert len(groups) == 16


def test_vocab_range_covers_vocab_once():
    rows = [r for t in range(8) for r in range(*vocab_range(128256, 8, t))]
    assert rows == list(range(128256))
