"""Attention implementations for packed / prefix-shared rows: the choice, and FlexAttention's
block mask giving the same numbers as the unpacked forward while skipping tiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipe_runner.data.packing import pack_pairs
from recipe_runner.errors import UserError
from recipe_runner.model.attention import (attention_implementation, choose_attention, flex_block_mask,
                                           packed_pair_logprobs, set_attention)
from recipe_runner.recipe import load_recipe
from test_packing import PAD, make_examples, random_model, unpacked

ROOT = Path(__file__).resolve().parents[1]


def test_auto_choice_per_device_and_layout():
    assert choose_attention("auto", "cuda", block_mask=True) == "flex_attention"
    assert choose_attention("auto", "cuda", block_mask=False) == "sdpa"
    assert choose_attention("auto", "cpu", block_mask=True) == "sdpa"
    assert choose_attention("auto", "xla", block_mask=True) == "eager"
    assert choose_attention("eager", "cuda", block_mask=True) == "eager"


def test_set_attention_switches_the_model():
    model = random_model("sdpa")
    set_attention(model, "eager")
    assert attention_implementation(model) == "eager"


def test_flex_attention_refused_where_it_cannot_train():
    for device in ("cpu", "xla"):
        overrides = ["runner.attention=flex_attention"] + (["runner.data.padding=static"] if device == "xla" else [])
        with pytest.raises(UserError, match="runner.attention"):
            load_recipe(ROOT / "recipes/tiny-dpo.yaml", overrides, device=device)


def test_flex_block_mask_skips_tiles_nobody_sees():
    ex = make_examples(24, 97, seed=3, max_len=60)
    batch = pack_pairs(ex, pad_id=PAD, width=512, share_prefix=True)
    mask = flex_block_mask(batch["doc"], batch["branch"])
    # 128 x 128 tiles: a row holds many short units, so most off-diagonal tiles are never visited
    assert mask.sparsity() > 40.0


@pytest.mark.parametrize("share_prefix", [True, False])
def test_flex_forward_matches_unpacked(share_prefix):
    """FlexAttention has no CPU backward, so here only the forward is compared (gradients come
    from PyTorch's own FlexAttention autograd, on CUDA)."""
    torch._dynamo.reset()  # a fresh static compile: inductor's CPU code for a dynamic-shape recompile fails to build
    examples = make_examples(7, 97, seed=5, max_len=50)
    dense = random_model("sdpa")
    flex = random_model("flex_attention")
    flex.load_state_dict(dense.state_dict())
    batch = pack_pairs(examples, pad_id=PAD, width=160, share_prefix=share_prefix)
    with torch.no_grad():
        ref = unpacked(dense, examples)
        out = packed_pair_logprobs(flex, batch, device="cpu")
    torch.testing.assert_close(out["counts"], ref["counts"])
    torch.testing.assert_close(out["sums"], ref["sums"], atol=1e-4, rtol=1e-5)
