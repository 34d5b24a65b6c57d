"""Packing: several sequences per row, attention confined to each, same numbers as unpacked rows."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from recipe_runner.data.batches import collate_pairs
from recipe_runner.data.packing import CHOSEN, REJECTED, first_fit, group_pairs, pack_pairs, rows_needed
from recipe_runner.data.tiny import TINY_MODEL
from recipe_runner.model.attention import block_causal_mask, packed_pair_logprobs
from recipe_runner.model.logprobs import sequence_logprobs
from recipe_runner.model.losses import dpo_loss, orpo_loss

PAD = 2


def make_examples(n: int, vocab: int, seed: int = 0, max_len: int = 40, merge_every: int = 0) -> list[dict]:
    """Tokenized pairs like data/tokenize.py makes: prompt labels -100, the same prompt before
    both answers (except, every merge_every-th pair, a differing last prompt token: BPE merge)."""
    g = torch.Generator().manual_seed(seed)

    def rand(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    out = []
    for i in range(n):
        p = int(torch.randint(2, max_len // 2, (1,), generator=g))
        lc, lr = (int(torch.randint(1, max_len // 2, (1,), generator=g)) for _ in range(2))
        prompt, chosen, rejected = rand(p), rand(lc), rand(lr)
        rprompt = list(prompt)
        if merge_every and i % merge_every == 0:
            rprompt[-1] = (rprompt[-1] + 1) % vocab or 3
        out.append({"id": 10 + i,
                    "chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * p + chosen,
                    "rejected_input_ids": rprompt + rejected, "rejected_labels": [-100] * p + rejected})
    return out


def random_model(attn: str = "sdpa", vocab: int = 97, seed: int = 0, tied: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, attn_implementation=attn)
    return LlamaForCausalLM(cfg).float()


def unpacked(model, examples, full_chosen=False):
    batch = collate_pairs(examples, pad_id=PAD, pad_to=None)
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
    w = model.get_output_embeddings().weight
    sums, counts = sequence_logprobs(hidden, w, batch["labels"])
    out = {"sums": sums, "counts": counts}
    if full_chosen:
        b = len(examples)
        ids, mask = batch["input_ids"][:b], batch["attention_mask"][:b]
        full = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        out["full_sums"], out["full_counts"] = sequence_logprobs(hidden[:b], w, full)
    return out


def losses(out, b, algorithm):
    s, c = out["sums"], out["counts"].float()
    if algorithm == "dpo":
        ref_c, ref_r = s[:b].detach() * 0.9, s[b:].detach() * 1.1
        return dpo_loss(s[:b], s[b:], ref_c, ref_r, beta=0.1, loss_type="sigmoid", label_smoothing=0.0)["loss"]
    mc, mr = s[:b] / c[:b], s[b:] / c[b:]
    nll = -out["full_sums"] / out["full_counts"].float()
    return orpo_loss(mc, mr, nll, beta=0.1)["loss"]


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_same(model, examples, *, share_prefix, width, algorithm="dpo", static=False):
    b = len(examples)
    full = algorithm == "orpo"
    ref = unpacked(model, examples, full_chosen=full)
    g_ref = grads(model, losses(ref, b, algorithm))
    kw = dict(num_rows=2 * b, trim=False) if static else {}
    batch = pack_pairs(examples, pad_id=PAD, width=width, share_prefix=share_prefix, **kw)
    out = packed_pair_logprobs(model, batch, device="cpu", static_shapes=static, full_chosen=full)
    torch.testing.assert_close(out["counts"], ref["counts"])
    torch.testing.assert_close(out["sums"], ref["sums"], atol=1e-4, rtol=1e-5)
    if full:
        torch.testing.assert_close(out["full_counts"], ref["full_counts"])
        torch.testing.assert_close(out["full_sums"], ref["full_sums"], atol=1e-4, rtol=1e-5)
    l_ref, l_out = losses(ref, b, algorithm), losses(out, b, algorithm)
    torch.testing.assert_close(l_out, l_ref, atol=1e-6, rtol=1e-5)
    g_out = grads(model, l_out)
    assert g_out.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_out[name], g_ref[name], atol=1e-6, rtol=1e-4, msg=name)
    return batch


def test_first_fit_is_deterministic_longest_first():
    assert first_fit([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert first_fit([4, 4, 4], 8) == [[0, 1], [2]]


def test_layout_restarts_positions_and_blocks_labels():
    ex = make_examples(3, 50, seed=1, max_len=20)
    batch = pack_pairs(ex, pad_id=PAD, width=40, share_prefix=False)
    # every sequence appears once with positions 0..L-1, its first label -100, its labels intact
    seen = []
    for r in range(batch["input_ids"].shape[0]):
        for d in batch["doc"][r].unique().tolist():
            if d < 0:
                continue
            at = batch["doc"][r] == d
            pos = batch["position_ids"][r][at]
            assert pos.tolist() == list(range(len(pos)))
            seen.append((batch["branch"][r][at][0].item(), batch["segments"][r][at][0].item(),
                         batch["input_ids"][r][at].tolist(), batch["labels"][r][at].tolist()))
    assert len(seen) == 6
    for branch, seg, ids, labels in seen:
        e = ex[seg % 3]
        key = "chosen" if branch == CHOSEN else "rejected"
        assert (seg < 3) == (branch == CHOSEN) and branch in (CHOSEN, REJECTED)
        assert ids == e[f"{key}_input_ids"] and labels == e[f"{key}_labels"]
    assert batch["attention_mask"].sum() == sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in ex)
    assert batch["input_ids"].shape[0] < 6  # fewer rows than collate_pairs' 2B


def test_mask_confines_attention_to_each_sequence():
    doc = torch.tensor([[0, 0, 0, 1, 1, -1]])
    branch = torch.tensor([[1, 1, 1, 2, 2, 0]])
    m = block_causal_mask(doc, branch)[0, 0].int()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0],
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]])
    assert torch.equal(m, expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("algorithm", ["dpo", "orpo"])
def test_packed_equals_unpacked_random_llama(attn, algorithm):
    model = random_model(attn)
    ex = make_examples(5, 97, seed=2, max_len=40, merge_every=3)
    batch = check_same(model, ex, share_prefix=False, width=48, algorithm=algorithm)
    assert batch["input_ids"].shape[0] < 10


def test_tied_embeddings_packed_equals_unpacked():
    """Llama-3.2-1B ties the LM head to the embedding: the chunked head reads the same tensor the
    embedding uses, and both gradients land in it."""
    model = random_model("sdpa", tied=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ex = make_examples(4, 97, seed=8, max_len=40)
    check_same(model, ex, share_prefix=True, width=96)


def test_packed_static_shapes_equal_unpacked():
    model = random_model("sdpa")
    ex = make_examples(4, 97, seed=3, max_len=40)
    batch = check_same(model, ex, share_prefix=False, width=48, static=True)
    assert tuple(batch["input_ids"].shape) == (8, 48)


def test_packed_equals_unpacked_on_tiny_asset_model():
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    ex = make_examples(4, model.config.vocab_size, seed=4, max_len=60)
    for algorithm in ("dpo", "orpo"):
        check_same(model, ex, share_prefix=False, width=64, algorithm=algorithm)


def test_group_pairs_fills_rows_and_keeps_order():
    ex = make_examples(12, 97, seed=5, max_len=40)
    groups = group_pairs(ex, max_rows=4, width=48, share_prefix=False)
    assert [e["id"] for g in groups for e in g] == [e["id"] for e in ex]
    assert all(rows_needed(g, width=48, share_prefix=False) <= 4 for g in groups)
    assert len(groups) < 12 / 2  # unpacked, 4 rows hold 2 pairs per forward
    with pytest.raises(ValueError, match="does not fit"):
        pack_pairs(ex, pad_id=PAD, width=10, share_prefix=False)


def test_group_pairs_caps_pairs_per_forward():
    ex = make_examples(12, 97, seed=5, max_len=12)  # short: many fit a row
    free = group_pairs(ex, max_rows=2, width=96, share_prefix=True)
    capped = group_pairs(ex, max_rows=2, width=96, share_prefix=True, max_pairs=3)
    assert max(len(g) for g in free) > 3 and [len(g) for g in capped] == [3, 3, 3, 3]
    assert [e["id"] for g in capped for e in g] == [e["id"] for e in ex]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_fixed_pair_slots_leave_padding_slots_empty(share_prefix):
    """Static shapes: num_pairs > len(examples) gives every forward the same outputs; the real
    pairs' sums are those of the unpadded layout, the empty slots score nothing."""
    model = random_model("sdpa")
    ex = make_examples(3, 97, seed=6, max_len=30)
    plain = pack_pairs(ex, pad_id=PAD, width=64, share_prefix=share_prefix)
    slots = pack_pairs(ex, pad_id=PAD, width=64, share_prefix=share_prefix, num_rows=4, trim=False, num_pairs=5)
    assert int(slots["num_pairs"]) == 5 and tuple(slots["input_ids"].shape) == (4, 64)
    with torch.no_grad():
        a = packed_pair_logprobs(model, plain, device="cpu", full_chosen=True)
        b = packed_pair_logprobs(model, slots, device="cpu", static_shapes=True, full_chosen=True)
    real = [0, 1, 2, 5, 6, 7]  # chosen 0..2 and rejected 5..7 of 10 slots
    torch.testing.assert_close(b["sums"][real], a["sums"], atol=1e-4, rtol=1e-5)
    assert torch.equal(b["counts"][real], a["counts"])
    assert b["counts"][[3, 4, 8, 9]].tolist() == [0, 0, 0, 0] and b["sums"][[3, 4, 8, 9]].tolist() == [0.0] * 4
    torch.testing.assert_close(b["full_sums"][:3], a["full_sums"], atol=1e-4, rtol=1e-5)
    empty = pack_pairs([], pad_id=PAD, width=64, share_prefix=share_prefix, num_rows=2, trim=False, num_pairs=2)
    assert empty["attention_mask"].sum() == 0 and tuple(empty["input_ids"].shape) == (2, 64)
