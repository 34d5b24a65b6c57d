"""Per-sequence log-probs (chunked, never materialising [N, T, V]) against TRL's log-softmax
gather on odd shapes, in both the data-dependent and the static-shape (XLA) modes, with chunk
sizes that do not divide T, forward and backward."""

from __future__ import annotations

import os

import pytest
import torch

from recipe_runner.model.logprobs import IGNORE_INDEX, model_logprobs, sequence_logprobs

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
ATOL, RTOL = 1e-5, 5e-4
B, T, H, V = 3, 47, 31, 123


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :9] = IGNORE_INDEX  # prompt
    labels[0, 40:] = IGNORE_INDEX  # right padding
    labels[1, :1] = IGNORE_INDEX  # almost everything scored
    labels[2, :30] = IGNORE_INDEX  # short response with a hole in it
    labels[2, 33:35] = IGNORE_INDEX
    return hidden, weight, labels


def _trl_reference(hidden, weight, labels, average=False):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits = hidden @ weight.t()
    return ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)


def _trl_selective(hidden, weight, labels):
    """Sum via trl.trainer.utils.selective_log_softmax, shifting and masking by hand."""
    from trl.trainer.utils import selective_log_softmax

    logits = (hidden @ weight.t())[:, :-1]
    lab = labels[:, 1:]
    mask = lab != IGNORE_INDEX
    per_token = selective_log_softmax(logits, lab.clamp(min=0))
    return (per_token * mask).sum(-1), mask.sum(-1)


MODES = [(False, 512), (False, 7), (False, 1), (True, 512), (True, 10), (True, 13), (True, 46)]


@pytest.mark.parametrize("static,chunk", MODES)
def test_sequence_logprobs_matches_trl(static, chunk):
    hidden, weight, labels = _inputs()
    sums, counts = sequence_logprobs(hidden, weight, labels, chunk_size=chunk, static_shapes=static)
    ref_sums, ref_counts = _trl_selective(hidden, weight, labels)
    assert sums.shape == (B,) and sums.dtype == torch.float32
    torch.testing.assert_close(sums, ref_sums, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(counts, ref_counts)
    assert counts.tolist() == [31, 46, 15]
    torch.testing.assert_close(sums, _trl_reference(hidden, weight, labels), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(sums / counts, _trl_reference(hidden, weight, labels, average=True),
                               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("static,chunk", [(False, 7), (True, 13), (False, 512)])
def test_sequence_logprobs_gradients_match_trl(static, chunk):
    hidden, weight, labels = _inputs(1)
    coef = torch.tensor([0.7, -1.3, 2.0])
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    sums, _ = sequence_logprobs(h1, w1, labels, chunk_size=chunk, static_shapes=static)
    (sums * coef).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    (_trl_reference(h2, w2, labels) * coef).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(w1.grad, w2.grad, atol=ATOL, rtol=RTOL)
    # positions that are never scored (prompt, padding, the last position) get no gradient
    assert h1.grad[0, :8].abs().max() == 0 and h1.grad[0, 39:].abs().max() == 0
    assert h1.grad[:, -1].abs().max() == 0


def test_sequence_without_scored_tokens_gives_zero():
    hidden, weight, labels = _inputs(2)
    labels[1] = IGNORE_INDEX
    for static in (False, True):
        sums, counts = sequence_logprobs(hidden, weight, labels, chunk_size=5, static_shapes=static)
        assert sums[1].item() == 0.0 and counts[1].item() == 0
    labels[:] = IGNORE_INDEX
    sums, counts = sequence_logprobs(hidden, weight, labels)
    assert sums.tolist() == [0.0, 0.0, 0.0] and counts.tolist() == [0, 0, 0]


def test_bf16_inputs_give_fp32_logprobs():
    hidden, weight, labels = _inputs(3)
    sums, _ = sequence_logprobs(hidden.bfloat16(), weight.bfloat16(), labels, chunk_size=11)
    assert sums.dtype == torch.float32
    ref, _ = _trl_selective(hidden.bfloat16().float(), weight.bfloat16().float(), labels)
    torch.testing.assert_close(sums, ref, atol=0.5, rtol=2e-2)  # bf16 matmul, fp32 log-softmax


def test_model_logprobs_matches_full_logits_with_padding():
    """The decoder + LM-head path equals scoring the model's own full logits (TRL's way),
    with right padding masked out of attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    _, _, labels = _inputs(4)
    ids = labels.clamp(min=0).clone()
    ids[0, :9] = torch.arange(9) + 1
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 40:] = 0
    ids[0, 40:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        for static in (False, True):
            sums, counts = model_logprobs(model, ids, mask, labels, chunk_size=9, static_shapes=static)
            from trl.experimental.orpo.orpo_trainer import ORPOTrainer

            torch.testing.assert_close(sums, ORPOTrainer.get_batch_logps(logits, labels), atol=ATOL, rtol=RTOL)
            assert counts.tolist() == [31, 46, 15]
