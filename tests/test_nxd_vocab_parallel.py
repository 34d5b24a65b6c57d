"""Vocab-parallel log-probs split over simulated tensor-parallel ranks equal the unsplit
sequence log-probs of model/logprobs.py, values and gradients. Ranks run as threads and the
all-reduces meet at a barrier, so the adapter's code runs unchanged (only the collective is fake)."""

from __future__ import annotations

import threading

import pytest
import torch

from recipe_runner.backends.nxd.plan import vocab_range
from recipe_runner.backends.nxd.vocab_parallel import (combine, local_logit_grad, local_max, local_sum_exp,
                                                       local_target_logit, vocab_parallel_sequence_logprobs,
                                                       vocab_parallel_token_logps)
from recipe_runner.model.logprobs import sequence_logprobs


class FakeGroup:
    """All-reduce among `size` threads: each contributes, all receive the reduction."""

    def __init__(self, size: int):
        self.size, self.barrier, self.lock, self.box = size, threading.Barrier(size), threading.Lock(), []

    def reduce(self, op):
        def run(t: torch.Tensor) -> torch.Tensor:
            with self.lock:
                self.box.append(t.detach().clone())
            self.barrier.wait()
            out = self.box[0]
            for x in self.box[1:]:
                out = torch.maximum(out, x) if op == "max" else out + x
            self.barrier.wait()
            with self.lock:
                self.box.clear() if len(self.box) == self.size else None
            self.barrier.wait()
            t.copy_(out)
            return t
        return run


def run_ranks(tp: int, fn):
    group, results, errors = FakeGroup(tp), [None] * tp, []

    def work(r):
        try:
            results[r] = fn(r, group.reduce("max"), group.reduce("sum"))
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_staged_math_over_a_loop_of_ranks():
    """The three all-reduces written as a plain loop over ranks."""
    torch.manual_seed(0)
    V, tp, n = 48, 4, 10
    logits = torch.randn(n, V, dtype=torch.float64) * 5
    labels = torch.randint(0, V, (n,))
    shards = [logits[:, slice(*vocab_range(V, tp, r))] for r in range(tp)]
    starts = [vocab_range(V, tp, r)[0] for r in range(tp)]
    m = torch.stack([local_max(s) for s in shards]).amax(0)
    S = sum(local_sum_exp(s, m) for s in shards)
    T = sum(local_target_logit(s, labels, st)[0] for s, st in zip(shards, starts))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(combine(T, m, S), expected)
    # gradient: local pieces concatenated equal the full gradient of sum(g * log p)
    g = torch.randn(n, dtype=torch.float64)
    full = logits.clone().requires_grad_(True)
    (torch.log_softmax(full, -1).gather(-1, labels[:, None]).squeeze(-1) * g).sum().backward()
    pieces = torch.cat([local_logit_grad(s, labels, st, m, S, g) for s, st in zip(shards, starts)], dim=-1)
    torch.testing.assert_close(pieces, full.grad)


FP32 = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sequence_logprobs_split_equal_unsplit(tp):
    """The reference scores in fp32; the split version keeps fp64 inputs in fp64."""
    torch.manual_seed(tp)
    N, T, H, V = 3, 21, 8, 64
    hidden = torch.randn(N, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64)
    labels = torch.randint(0, V, (N, T))
    labels[:, :5] = -100
    labels[1, 15:] = -100  # padding
    g_sum = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    h_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_sums, ref_counts = sequence_logprobs(h_ref, w_ref, labels, chunk_size=4, static_shapes=True)
    (ref_sums * g_sum).sum().backward()

    def rank(r, reduce_max, reduce_sum):
        start, stop = vocab_range(V, tp, r)
        h = hidden.clone().requires_grad_(True)
        w = weight[start:stop].clone().requires_grad_(True)
        sums, counts = vocab_parallel_sequence_logprobs(h, w, labels, start, reduce_max=reduce_max,
                                                        reduce_sum=reduce_sum, chunk_size=4)
        (sums * g_sum).sum().backward()
        return sums.detach(), counts, h.grad, w.grad

    out = run_ranks(tp, rank)
    for sums, counts, _, _ in out:  # every rank ends with the full answer
        torch.testing.assert_close(sums.float(), ref_sums.detach(), **FP32)
        assert torch.equal(counts, ref_counts)
    # the LM-head gradient is local: the shards' grads stack to the full one
    torch.testing.assert_close(torch.cat([o[3] for o in out]), w_ref.grad, **FP32)
    # the hidden gradient is a partial sum per rank: the copy-to-tp-region all-reduce sums it
    torch.testing.assert_close(sum(o[2] for o in out), h_ref.grad, **FP32)


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1000.0, -1000.0, 0.0, 999.0]])
    out = vocab_parallel_token_logps(logits, torch.tensor([3]), 0)
    torch.testing.assert_close(out, torch.log_softmax(logits, -1)[:, 3])


@pytest.mark.parametrize("tp", [1, 3])
def test_packed_segments_split_equal_unsplit(tp):
    """Packed rows under tensor parallelism: per-segment sums of the vocab-split LM head equal the
    unsplit ones (values and gradients), and packed_pair_logprobs takes the split scorer."""
    import functools

    from recipe_runner.data.packing import pack_pairs
    from recipe_runner.model.attention import packed_hidden, packed_pair_logprobs
    from test_packing import PAD, make_examples, random_model

    V = 96  # NxD splits the vocabulary evenly over tp ranks
    model = random_model("sdpa", vocab=V)
    ex = make_examples(4, V, seed=7, max_len=30)
    batch = pack_pairs(ex, pad_id=PAD, width=96, share_prefix=True, num_rows=2, trim=False, num_pairs=6)
    seg = dict(segments=batch["segments"], num_segments=12)
    with torch.no_grad():
        hidden = packed_hidden(model, batch, "cpu").double()
    weight, labels = model.get_output_embeddings().weight.detach().double(), batch["labels"]
    g = torch.randn(12, dtype=torch.float64)
    h_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_sums, ref_counts = sequence_logprobs(h_ref, w_ref, labels, static_shapes=True, chunk_size=16, **seg)
    (ref_sums * g).sum().backward()

    def rank(r, reduce_max, reduce_sum):
        start, stop = vocab_range(V, tp, r)
        h, w = hidden.clone().requires_grad_(True), weight[start:stop].clone().requires_grad_(True)
        sums, counts = vocab_parallel_sequence_logprobs(h, w, labels, start, reduce_max=reduce_max,
                                                        reduce_sum=reduce_sum, chunk_size=16, **seg)
        (sums * g).sum().backward()
        return sums.detach(), counts, h.grad, w.grad

    out = run_ranks(tp, rank)
    for sums, counts, _, _ in out:
        torch.testing.assert_close(sums.float(), ref_sums.detach(), **FP32)
        assert torch.equal(counts, ref_counts)
    assert ref_counts[[4, 5, 10, 11]].tolist() == [0, 0, 0, 0]  # empty pair slots
    torch.testing.assert_close(torch.cat([o[3] for o in out]), w_ref.grad, **FP32)
    torch.testing.assert_close(sum(o[2] for o in out), h_ref.grad, **FP32)

    with torch.no_grad():
        plain = packed_pair_logprobs(model, batch, device="cpu", static_shapes=True)
        split = packed_pair_logprobs(model, batch, device="cpu",
                                     logprobs=functools.partial(vocab_parallel_sequence_logprobs, vocab_start=0))
    torch.testing.assert_close(split["sums"], plain["sums"], **FP32)


def test_hand_written_attention_reads_both_mask_forms():
    """backends/nxd's attention turns model_mask's sdpa (bool) and eager (additive) forms into
    the same allowed-keys matrix, and falls back to causal."""
    from recipe_runner.model.attention import allowed_keys, block_causal_mask

    doc = torch.tensor([[0, 0, 1, 1, 1, -1]])
    branch = torch.tensor([[1, 1, 0, 1, 2, 0]])
    dense = block_causal_mask(doc, branch)
    additive = torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)
    assert torch.equal(allowed_keys(dense, 6, "cpu"), dense)
    assert torch.equal(allowed_keys(additive, 6, "cpu"), dense)
    assert torch.equal(allowed_keys(None, 4, "cpu"), torch.ones(4, 4, dtype=torch.bool).tril())
