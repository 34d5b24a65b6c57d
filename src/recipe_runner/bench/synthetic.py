"""What both engines of `recipe-runner bench` share: model shapes, synthetic preference rows,
a word-level tokenizer (one token per word, so both engines see the same token counts), FLOP
accounting and a measured bf16 matmul peak. Nothing here downloads anything."""

from __future__ import annotations

import math
import time

import torch

SHAPES = {  # random-init Llama-architecture configs (the shapes of /work/shared/bench/ANCHORS.md)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
# (fixed, orca) sequence lengths when --seq is not given
DEFAULT_SEQ = {"tiny": (128, 1024), "llama3.2-1b": (2048, 4096), "llama3-8b": (4096, 4096)}
SPECIAL = ("<pad>", "<s>", "</s>")


def default_seq(shape: str, lengths: str) -> int:
    fixed, orca = DEFAULT_SEQ[shape]
    return fixed if lengths == "fixed" else orca


def config_dict(shape: str, seq: int) -> dict:
    """A Llama config.json body; bos/eos/pad are the tokenizer's last three ids."""
    c = dict(SHAPES[shape])
    v = c["vocab_size"]
    return dict(c, model_type="llama", architectures=["LlamaForCausalLM"], max_position_embeddings=max(seq, 512),
                rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu", attention_bias=False, mlp_bias=False,
                pad_token_id=v - 3, bos_token_id=v - 2, eos_token_id=v - 1, use_cache=False)


def make_tokenizer(vocab: int):
    """Words t0..t{V-4} and <pad> <s> </s>: whitespace-split, one id per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - len(SPECIAL))}
    for s in SPECIAL:
        words[s] = len(words)
    tk = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_rows(n: int, vocab: int, seq: int, lengths: str, seed: int = 1) -> list[dict]:
    """Prompt/chosen/rejected text rows. fixed: prompt and answers of seq/2 - 1 words each (with
    BOS and EOS the longer sequence is exactly seq). orca: lognormal like the orca DPO set
    (prompt median 245 words, answers 180), clipped so nothing needs truncating in either engine."""
    g = torch.Generator().manual_seed(seed)
    half = seq // 2 - 1

    def text(k: int) -> str:
        return " ".join(f"t{int(x)}" for x in torch.randint(10, vocab - 10, (k,), generator=g))

    def lognormal(median: float, sigma: float, lo: int) -> int:
        x = torch.empty(1).log_normal_(math.log(median), sigma, generator=g).item()
        return int(min(half, max(lo, x)))

    rows = []
    for _ in range(n):
        if lengths == "fixed":
            p, c, r = half, half, half
        else:
            p, c, r = lognormal(245, 0.7, 16), lognormal(180, 0.8, 8), lognormal(180, 0.8, 8)
        rows.append({"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)})
    return rows


def matmul_params(c: dict) -> int:
    h, i, n_layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return n_layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v


def model_flops_per_token(c: dict, mean_len: float) -> float:
    """Training FLOPs per token of the *logical* work (every token of prompt+chosen and
    prompt+rejected, full LM head, causal attention): the same yardstick for both engines, so
    an engine that skips work (shared prompts, response-only LM head) shows it as speed."""
    return 6 * matmul_params(c) + 6 * c["num_hidden_layers"] * mean_len * c["hidden_size"]


def bf16_matmul_peak_tflops(n: int = 8192, reps: int = 20) -> float | None:
    """Measured dense bf16 matmul rate of this GPU (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
