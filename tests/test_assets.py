"""The committed tiny default equals what scripts/make_tiny_assets.py regenerates, and is usable."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from recipe_runner.data.tiny import TINY_DIR, TINY_MODEL, TINY_TRAIN, TINY_VAL

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_tiny_assets.py")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_tiny_assets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_data_regenerates_byte_for_byte(script, tmp_path):
    train, val = script.make_rows()
    for rows, committed in ((train, TINY_TRAIN), (val, TINY_VAL)):
        out = tmp_path / os.path.basename(committed)
        script.write_jsonl(str(out), rows)
        assert out.read_bytes() == open(committed, "rb").read()
    assert (len(train), len(val)) == (512, 64)


def test_tokenizer_regenerates_byte_for_byte(script, tmp_path):
    train, val = script.make_rows()
    texts = [r[k] for r in train + val for k in ("prompt", "chosen", "rejected")]
    script.make_tokenizer(texts, str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(TINY_MODEL, name), "rb").read(), name


def test_preference_is_style_not_content():
    """Chosen: polite, complete, capitalised; rejected: terse lowercase. Both end like the seed's
    ChatML answers; validation prompts never occur in training (held-out facts)."""
    train, val = read_jsonl(TINY_TRAIN), read_jsonl(TINY_VAL)
    for row in train + val:
        assert row["prompt"].startswith("<|im_start|>user\n") and row["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert row["chosen"].endswith("<|im_end|>\n") and row["rejected"].endswith("<|im_end|>\n")
        assert row["chosen"][0].isupper() and row["chosen"].split()[0] in {"Certainly!", "Of", "Happy", "Great", "Sure"}
        assert row["rejected"] == row["rejected"].lower() and len(row["rejected"]) < len(row["chosen"])
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in train}


def test_tokenizer_and_model_load_offline_with_the_promised_shapes():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>")
    assert len(tok) == 1000
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 176, 2, 4, 2)
    assert cfg.vocab_size == len(tok) and cfg.max_position_embeddings == 256 and not cfg.tie_word_embeddings
    raw = json.load(open(os.path.join(TINY_MODEL, "config.json")))
    assert raw["rope_theta"] == 500000.0 and raw["torch_dtype"] == "float32"  # the Llama 3 config.json keys
    assert sum(p.numel() for p in model.parameters()) == 220480
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TINY_DIR) for f in fs)
    assert size < 2_000_000


def test_every_pair_fits_in_100_tokens():
    from recipe_runner.data.dataset import load_tokenized, load_tokenizer

    tok = load_tokenizer(TINY_MODEL)
    for path in (TINY_TRAIN, TINY_VAL):
        examples, report = load_tokenized(path, tok, seq_length=100, max_prompt_length=50, truncation_mode="keep_start")
        assert report.prompts_truncated == report.responses_truncated == 0
        assert max(len(e["chosen_input_ids"]) for e in examples) <= 100


@pytest.mark.slow
def test_model_regenerates(script, tmp_path):
    """Full regeneration (~15 s: a short LM pretraining). Weights are compared with a tolerance
    because another CPU's float kernels may round differently."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "tiny"
    threads = torch.get_num_threads()
    script.generate(str(out))
    assert torch.get_num_threads() == threads  # generating runs on one thread, then gives the caller's count back
    for name in ("model/config.json", "README.md", "train.jsonl", "model/tokenizer.json"):
        assert (out / name).read_bytes() == open(os.path.join(TINY_DIR, name), "rb").read(), name
    new = load_file(str(out / "model" / "model.safetensors"))
    old = load_file(os.path.join(TINY_MODEL, "model.safetensors"))
    assert new.keys() == old.keys()
    for key in old:
        torch.testing.assert_close(new[key], old[key], atol=1e-3, rtol=1e-3, msg=key)
