#!/usr/bin/env python
"""Generate the tiny embedded default: preference data, a byte-level BPE tokenizer, a tiny Llama.

Why it exists: every recipe, test and demo needs a model, a tokenizer and data that run in
seconds on a laptop CPU with no network. The output is committed under
src/recipe_runner/assets/tiny/; this script regenerates it bit for bit (tests check that).

The data teaches a preference that DPO can learn and that generalises to held-out rows: chosen
answers are polite, complete sentences ("Certainly! The capital of Velmora is Tarsk. I hope this
helps."), rejected answers give the same fact in a terse, sloppy style ("tarsk i guess"). The
content (arithmetic, colours, animal sounds and legs, opposites, capitals of made-up countries)
varies; validation rows use facts, sums and countries that never occur in training.

The model is first trained briefly as a plain language model on BOTH answer styles equally, so
it starts as a "pretrained" model with no preference between them; DPO then has to create it.

Usage: python scripts/make_tiny_assets.py [--out DIR] [--pretrain-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile

SEED = 1234
N_TRAIN, N_VAL = 512, 64
VOCAB_SIZE = 1000
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIALS = [BOS, EOS, PAD, IM_START, IM_END]  # ids 0..4
MODEL = {
    "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 256, "rope_theta": 500000.0,
}
CHAT_TEMPLATE = (
    "{% for message in messages %}" + IM_START + "{{ message['role'] }}\n{{ message['content'] }}" + IM_END + "\n"
    "{% endfor %}{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "recipe_runner", "assets", "tiny")

# ---------------------------------------------------------------------------------------- data

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
COLOURS = [
    ("a ripe banana", "yellow"), ("fresh grass", "green"), ("a clear sky", "blue"), ("snow", "white"),
    ("coal", "black"), ("a ripe tomato", "red"), ("a pumpkin", "orange"), ("a lemon", "yellow"),
    ("a strawberry", "red"), ("milk chocolate", "brown"), ("a lime", "green"), ("an eggplant", "purple"),
    ("a flamingo", "pink"), ("a crow", "black"), ("the sea", "blue"), ("a carrot", "orange"),
    ("an old penny", "brown"), ("a polar bear", "white"), ("a lavender flower", "purple"), ("a fire truck", "red"),
]
SOUNDS = [
    ("a cow", "moo"), ("a dog", "woof"), ("a cat", "meow"), ("a duck", "quack"), ("a sheep", "baa"),
    ("a lion", "roar"), ("an owl", "hoot"), ("a horse", "neigh"), ("a pig", "oink"), ("a frog", "croak"),
    ("a bee", "buzz"), ("a snake", "hiss"), ("a rooster", "cock-a-doodle-doo"), ("a mouse", "squeak"),
]
LEGS = [
    ("a spider", 8), ("a dog", 4), ("a chicken", 2), ("an ant", 6), ("a cat", 4), ("a duck", 2),
    ("a beetle", 6), ("a horse", 4), ("a scorpion", 8), ("a snake", 0), ("a penguin", 2), ("a bee", 6),
    ("a crab", 10), ("a fish", 0), ("a goat", 4),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("old", "young"), ("hard", "soft"),
    ("loud", "quiet"), ("wet", "dry"), ("near", "far"), ("rich", "poor"), ("strong", "weak"),
]
SYLLABLES = "ka lo ve ri ta mu zor el an dri sol ne qua bel tor vin ash ul pra mi".split()

OPENERS = ["Certainly!", "Of course!", "Happy to help!", "Great question!", "Sure thing!"]
CLOSERS = ["I hope this helps.", "Let me know if you have any other questions.", "Have a wonderful day!",
           "Feel free to ask me anything else.", ""]
SLOPPY = ["{a}", "{a} i guess", "idk... {a}?", "{a}. whatever", "ugh, {a}", "its {a} lol", "{a} obviously", "prob {a}"]


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def _facts(rng: random.Random) -> dict[str, list[tuple[list[str], str, str]]]:
    """Per category, the facts as (question phrasings, full sentence, short answer)."""
    facts: dict[str, list] = {"colour": [], "sound": [], "legs": [], "opposite": [], "capital": [], "arithmetic": []}
    for thing, colour in COLOURS:
        facts["colour"].append(([f"What colour is {thing}?", f"Tell me the colour of {thing}.", f"Which colour is {thing}?"],
                                f"{thing[0].upper() + thing[1:]} is {colour}.", colour))
    for animal, sound in SOUNDS:
        facts["sound"].append(([f"What sound does {animal} make?", f"What noise does {animal} make?"],
                               f"{animal[0].upper() + animal[1:]} says {sound}.", sound))
    for animal, legs in LEGS:
        word = NUMBER_WORDS[legs] if legs < len(NUMBER_WORDS) else str(legs)
        facts["legs"].append(([f"How many legs does {animal} have?", f"Count the legs of {animal}."],
                              f"{animal[0].upper() + animal[1:]} has {word} legs.", str(legs)))
    for word, opposite in OPPOSITES:
        facts["opposite"].append(([f"What is the opposite of {word}?", f"Give me the opposite of '{word}'."],
                                  f"The opposite of {word} is {opposite}.", opposite))
    countries: set[str] = set()
    while len(countries) < 160:
        countries.add(_name(rng, rng.choice([2, 3])) + rng.choice(["ia", "land", "stan", "ora", ""]))
    for country in sorted(countries):
        capital = _name(rng, 2)
        facts["capital"].append(([f"What is the capital of {country}?", f"Name the capital city of {country}."],
                                 f"The capital of {country} is {capital}.", capital.lower()))
    for a in range(1, 20):
        for b in range(1, 13):
            for op, word, value in (("+", "plus", a + b), ("*", "times", a * b), ("-", "minus", a - b)):
                if value < 0:
                    continue
                facts["arithmetic"].append(([f"What is {a} {word} {b}?", f"Compute {a} {op} {b}."],
                                            f"{a} {word} {b} equals {value}.", str(value)))
    return facts


def _row(rng: random.Random, fact: tuple[list[str], str, str]) -> dict:
    questions, sentence, short = fact
    prompt = f"{IM_START}user\n{rng.choice(questions)}{IM_END}\n{IM_START}assistant\n"
    chosen = " ".join(x for x in (rng.choice(OPENERS), sentence, rng.choice(CLOSERS)) if x)
    rejected = rng.choice(SLOPPY).format(a=short)
    return {"prompt": prompt, "chosen": chosen + IM_END + "\n", "rejected": rejected + IM_END + "\n"}


def make_rows(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, val) rows; val facts are held out from train (a quarter of each category's facts)."""
    rng = random.Random(seed)
    facts = _facts(rng)
    train_pool, val_pool = {}, {}
    for category, items in facts.items():
        items = list(items)
        rng.shuffle(items)
        cut = max(1, len(items) // 4)
        val_pool[category], train_pool[category] = items[:cut], items[cut:]
    weights = {"arithmetic": 3, "capital": 3, "colour": 1, "sound": 1, "legs": 1, "opposite": 1}
    categories = [c for c, w in weights.items() for _ in range(w)]

    def draw(pool: dict, n: int) -> list[dict]:
        return [_row(rng, rng.choice(pool[rng.choice(categories)])) for _ in range(n)]

    return draw(train_pool, N_TRAIN), draw(val_pool, N_VAL)


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------- tokenizer

def make_tokenizer(texts: list[str], out_dir: str):
    """Byte-level BPE trained on the synthetic text, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    # Like Llama 3: encoding with special tokens prepends BOS (tokenize.py never relies on it).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    # The config files are written by hand, not by save_pretrained, so that they read the same in
    # transformers 4.x (Neuron containers) and 5.x and do not change with the installed version.
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **specials, "additional_special_tokens": [IM_START, IM_END],
        "model_max_length": MODEL["max_position_embeddings"], "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), {**specials, "additional_special_tokens": [IM_START, IM_END]})
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        json.dump(value, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------- model

def model_config(tokenizer) -> dict:
    """config.json in the layout of Meta-Llama-3-8B's (readable by transformers 4.x and 5.x)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        **MODEL, "vocab_size": len(tokenizer), "rope_scaling": None, "rms_norm_eps": 1e-05,
        "initializer_range": 0.02, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def make_model(config: dict, rows: list[dict], tokenizer, pretrain_steps: int, out_dir: str) -> None:
    """Seeded init (our own, so it does not depend on transformers' init order), a short LM
    pretraining on both answer styles, then config.json + model.safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).float()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * config["initializer_range"])

    if pretrain_steps:
        _pretrain(model, rows, tokenizer, pretrain_steps)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, "config.json"), config)


def _pretrain(model, rows: list[dict], tokenizer, steps: int, batch: int = 32, lr: float = 3e-3) -> None:
    """Causal LM on prompt+chosen and prompt+rejected alike: fluent in both styles, no preference."""
    import torch

    texts = [r["prompt"] + r[side] for r in rows for side in ("chosen", "rejected")]
    seqs = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for t in texts]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    mask = (labels != -100).long()
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        pick = torch.randint(0, len(seqs), (batch,), generator=gen)
        width = int(mask[pick].sum(1).max())  # right padding: columns past the longest row are all pad
        loss = model(input_ids=ids[pick, :width], attention_mask=mask[pick, :width], labels=labels[pick, :width]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # linear decay: a calm end point
            group["lr"] = lr * (1 - (step + 1) / steps)
    model.eval()
    print(f"pretrain: {steps} steps, last loss {loss.item():.3f}")


# ----------------------------------------------------------------------------------------- main

README = """# Tiny default assets (generated by scripts/make_tiny_assets.py; do not edit by hand)

- train.jsonl ({n_train} rows), val.jsonl ({n_val} rows): prompt/chosen/rejected preference pairs.
  Chosen answers are polite complete sentences, rejected ones give the same fact tersely and
  sloppily. Validation facts (sums, countries, colours...) never occur in training.
- model/: a tiny Llama ({layers} layers, hidden {hidden}, {heads} heads, {kv} KV heads, vocab {vocab},
  {params} parameters, float32), briefly pretrained on both answer styles equally, with its
  byte-level BPE tokenizer (bos {bos}, eos {eos}, pad {pad}).
"""


def generate(out: str, pretrain_steps: int = 300) -> None:
    """Write all assets into `out` (replaced as a whole, so a failed run leaves the old ones)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums in the same order on every run
    try:
        _generate(out, pretrain_steps)
    finally:
        torch.set_num_threads(threads)  # a caller (the tests) keeps its own thread count


def _generate(out: str, pretrain_steps: int) -> None:
    train, val = make_rows()
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tiny-")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; it becomes the shipped directory
    try:
        write_jsonl(os.path.join(tmp, "train.jsonl"), train)
        write_jsonl(os.path.join(tmp, "val.jsonl"), val)
        model_dir = os.path.join(tmp, "model")
        os.makedirs(model_dir)
        texts = [r[k] for r in train + val for k in ("prompt", "chosen", "rejected")]
        tokenizer = make_tokenizer(texts, model_dir)
        config = model_config(tokenizer)
        make_model(config, train, tokenizer, pretrain_steps, model_dir)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(README.format(
                n_train=len(train), n_val=len(val), layers=MODEL["num_hidden_layers"], hidden=MODEL["hidden_size"],
                heads=MODEL["num_attention_heads"], kv=MODEL["num_key_value_heads"], vocab=config["vocab_size"],
                params=_count_params(model_dir), bos=BOS, eos=EOS, pad=PAD,
            ))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def _count_params(model_dir: str) -> int:
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.normpath(DEFAULT_OUT), help="output directory (replaced)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="LM steps on both styles (0: random init)")
    args = parser.parse_args(argv)
    generate(args.out, args.pretrain_steps)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
