"""prepare-data: the seed's orca strings, field mapping, chat templates, HH splitting, the report,
the deterministic split and the manifest skip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from recipe_runner import cli
from recipe_runner.errors import UserError
from recipe_runner.prepare import formats
from recipe_runner.prepare.formats import prepare, split_is_validation
from recipe_runner.prepare.templates import Renderer, SkipRow, converter, hh

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------- orca
def test_orca_is_the_seed_template_byte_for_byte(tmp_path):
    rows = [
        {"system": "You are an AI assistant.", "question": "What is the capital of France?", "chosen": "Paris.", "rejected": "London."},
        {"system": "", "question": "Übersetze: cat", "chosen": "Katze", "rejected": "Hund"},
    ]
    out = tmp_path / "data_dpo.jsonl"
    prepare(str(write_jsonl(tmp_path / "orca.jsonl", rows)), str(out), format="orca")
    assert read_jsonl(out) == [
        {"prompt": "<|im_start|>\nYou are an AI assistant.<|im_end|>\n<|im_start|> What is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
         "chosen": "Paris.<|im_end|>\n", "rejected": "London.<|im_end|>\n"},
        {"prompt": "<|im_start|>\n<|im_end|>\n<|im_start|> Übersetze: cat<|im_end|>\n<|im_start|>assistant\n",
         "chosen": "Katze<|im_end|>\n", "rejected": "Hund<|im_end|>\n"},
    ]


def test_bad_rows_are_reported_with_line_numbers(tmp_path, capsys):
    good = {"system": "s", "question": "q", "chosen": "a", "rejected": "b"}
    lines = [
        good,                                                         # 1
        {**good, "question": "q2"},                                   # 2
        '{"system": "s", "question": ',                               # 3 malformed
        "",                                                           # 4 blank: ignored, not a row
        {"system": "s", "chosen": "a", "rejected": "b"},              # 5 missing question
        {**good, "chosen": ["a"]},                                    # 6 not a string
        {**good, "rejected": "   "},                                  # 7 empty
        {**good, "rejected": "a"},                                    # 8 identical
        "[1, 2]",                                                     # 9 not an object
        {**good, "question": "q3"},                                   # 10
        "{oops}",                                                     # 11 malformed
    ]
    report = prepare(str(write_jsonl(tmp_path / "raw.jsonl", lines)), str(tmp_path / "out.jsonl"), format="orca")
    assert report["read"] == 10 and report["written_train"] == 3 and report["skipped"] == 7
    assert report["skipped_by_reason"] == {
        "malformed JSON": {"count": 2, "first": ["line 3", "line 11"]},
        "missing field 'question'": {"count": 1, "first": ["line 5"]},
        "field 'chosen' is not a string": {"count": 1, "first": ["line 6"]},
        "empty field 'rejected'": {"count": 1, "first": ["line 7"]},
        "identical chosen and rejected": {"count": 1, "first": ["line 8"]},
        "not a JSON object": {"count": 1, "first": ["line 9"]},
    }
    out = capsys.readouterr().out
    assert "malformed JSON: 2 (line 3, line 11)" in out and "skipped:    7 rows" in out
    with pytest.raises(UserError, match="7 row\\(s\\) skipped and --strict is set; nothing written"):
        prepare(str(tmp_path / "raw.jsonl"), str(tmp_path / "strict.jsonl"), format="orca", strict=True)
    assert not (tmp_path / "strict.jsonl").exists()


def test_no_usable_rows_is_an_error(tmp_path):
    for _ in range(2):  # the failure leaves no output and no manifest, so a re-run fails again
        with pytest.raises(UserError, match="no training rows from"):
            prepare(str(write_jsonl(tmp_path / "raw.jsonl", [{"a": 1}])), str(tmp_path / "out.jsonl"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl.lock", "raw.jsonl"]


# ----------------------------------------------------------------------------------- fields
def test_fields_maps_other_column_names(tmp_path):
    rows = [{"instruction": "Say hi", "good": "Hi!", "bad": "No.", "extra": 1}]
    out = tmp_path / "out.jsonl"
    rc = cli.main(["prepare-data", "--input", str(write_jsonl(tmp_path / "raw.jsonl", rows)), "--output", str(out),
                   "--format", "fields", "--field", "prompt=instruction", "--field", "chosen=good", "--field", "rejected=bad"])
    assert rc == 0
    assert read_jsonl(out) == [{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}]


def test_fields_also_renames_for_orca():
    convert = converter("orca", {"question": "instruction"}, None)
    row = convert({"system": "S", "instruction": "Q", "chosen": "A", "rejected": "B"})
    assert row["prompt"] == "<|im_start|>\nS<|im_end|>\n<|im_start|> Q<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("fmt, fields, message", [
    ("fields", {"prompt": "q"}, "format fields needs fields"),
    ("preference", {"answer": "x"}, "answer not used by format preference"),
    ("fields", {"prompt": "q", "chosen": "c", "rejected": "r", "system": "s"}, "system column only has a place in a chat template"),
    ("alpaca", None, "format 'alpaca': use one of"),
])
def test_bad_field_settings(fmt, fields, message):
    with pytest.raises(UserError, match=message):
        converter(fmt, fields, None)


# ---------------------------------------------------------------------------- chat template
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_tokenizer(path: Path, template: str | None = TEMPLATE) -> Path:
    """A tiny word-level tokenizer saved with the chat template under test."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    if template:
        tok.chat_template = template
    tok.save_pretrained(str(path))
    return path


def test_chat_template_renders_prompt_and_continuations(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok")
    rows = [{"q": "Capital of France?", "sys": "Be brief.", "good": "Paris", "bad": "Rome"}]
    out = tmp_path / "out.jsonl"
    prepare(str(write_jsonl(tmp_path / "raw.jsonl", rows)), str(out), format="fields",
            fields={"prompt": "q", "system": "sys", "chosen": "good", "rejected": "bad"}, chat_template=True, tokenizer=str(tok_dir))
    assert read_jsonl(out) == [{
        "prompt": "<|system|>\nBe brief.<|end|>\n<|user|>\nCapital of France?<|end|>\n<|assistant|>\n",
        "chosen": "Paris<|end|>\n",
        "rejected": "Rome<|end|>\n",
    }]


def test_chat_template_with_orca_drops_an_empty_system(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok")
    rows = [{"system": "", "question": "Hi", "chosen": "Hello", "rejected": "Bye"}]
    out = tmp_path / "out.jsonl"
    prepare(str(write_jsonl(tmp_path / "raw.jsonl", rows)), str(out), format="orca", chat_template=True, tokenizer=str(tok_dir))
    assert read_jsonl(out)[0]["prompt"] == "<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_chat_template_that_cannot_be_split_is_refused(tmp_path):
    odd = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    tok_dir = make_tokenizer(tmp_path / "tok", odd)
    with pytest.raises(UserError, match="renders an assistant turn differently"):
        prepare(str(write_jsonl(tmp_path / "raw.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])),
                str(tmp_path / "out.jsonl"), chat_template=True, tokenizer=str(tok_dir))


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok", None)
    with pytest.raises(UserError, match="has no chat_template"):
        prepare(str(write_jsonl(tmp_path / "raw.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])),
                str(tmp_path / "out.jsonl"), chat_template=True, tokenizer=str(tok_dir))


# --------------------------------------------------------------------------------------- HH
def test_hh_strings_split_at_the_last_shared_assistant_turn():
    chosen = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross the road?"
    rejected = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: No."
    assert hh(chosen, rejected, None) == {
        "prompt": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant:",
        "chosen": " Why did the chicken cross the road?",
        "rejected": " No.",
    }


def test_hh_shared_words_after_the_marker_stay_in_the_responses():
    out = hh("\n\nHuman: Is it safe?\n\nAssistant: It is safe.", "\n\nHuman: Is it safe?\n\nAssistant: It is not.", None)
    assert out == {"prompt": "\n\nHuman: Is it safe?\n\nAssistant:", "chosen": " It is safe.", "rejected": " It is not."}


@pytest.mark.parametrize("chosen, rejected, reason", [
    ("\n\nHuman: A\n\nAssistant: x", "\n\nHuman: B\n\nAssistant: y", "no shared prefix"),
    ("\n\nHuman: A\n\nAssistant:", "\n\nHuman: A\n\nAssistant: y", "empty response"),
    ("\n\nHuman: A\n\nAssistant: x", [{"role": "user", "content": "A"}], "neither both strings nor both message lists"),
])
def test_hh_unusable_rows(chosen, rejected, reason):
    with pytest.raises(SkipRow, match=reason):
        hh(chosen, rejected, None)


def test_hh_message_lists_without_and_with_a_chat_template(tmp_path):
    shared = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    chosen, rejected = shared + [{"role": "assistant", "content": "4"}], shared + [{"role": "assistant", "content": "5"}]
    assert hh(chosen, rejected, None) == {  # the seed's ChatML style when no template is asked for
        "prompt": "<|im_start|> Hi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|> 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "chosen": "4<|im_end|>\n",
        "rejected": "5<|im_end|>\n",
    }
    from transformers import AutoTokenizer

    render = Renderer(AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path / "tok"))))
    assert hh(chosen, rejected, render) == {
        "prompt": "<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n",
        "chosen": "4<|end|>\n",
        "rejected": "5<|end|>\n",
    }
    # HH strings under a chat template become the same messages
    text_c = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: 2+2?\n\nAssistant: 4"
    text_r = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: 2+2?\n\nAssistant: 5"
    assert hh(text_c, text_r, render) == hh(chosen, rejected, render)


def test_hh_format_end_to_end_reports_rows(tmp_path):
    rows = [{"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"},
            {"chosen": "\n\nHuman: Q1\n\nAssistant: a", "rejected": "\n\nHuman: Q2\n\nAssistant: b"}]
    report = prepare(str(write_jsonl(tmp_path / "hh.jsonl", rows)), str(tmp_path / "out.jsonl"), format="hh")
    assert read_jsonl(tmp_path / "out.jsonl") == [{"prompt": "\n\nHuman: Q\n\nAssistant:", "chosen": " good", "rejected": " bad"}]
    assert report["skipped_by_reason"] == {"no shared prefix ending in an Assistant: turn": {"count": 1, "first": ["line 2"]}}


# ------------------------------------------------------------------------------------ split
def _rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


def test_split_is_deterministic_order_free_and_disjoint(tmp_path):
    rows = _rows(2000)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    outs = {}
    for name, data, seed in (("a", rows, 7), ("b", shuffled, 7), ("c", rows, 8)):
        prepare(str(write_jsonl(tmp_path / f"{name}.jsonl", data)), str(tmp_path / f"{name}-train.jsonl"),
                validation_fraction=0.1, validation_output=str(tmp_path / f"{name}-val.jsonl"), split_seed=seed)
        outs[name] = ({json.dumps(r) for r in read_jsonl(tmp_path / f"{name}-train.jsonl")},
                      {json.dumps(r) for r in read_jsonl(tmp_path / f"{name}-val.jsonl")})
    train, val = outs["a"]
    assert not train & val and len(train) + len(val) == 2000
    assert 140 <= len(val) <= 260  # 10% of 2000 = 200; binomial sd ~13
    assert outs["b"] == outs["a"]  # same seed, other row order: same split
    assert outs["c"][1] != val  # another seed: another split
    assert all(split_is_validation(json.loads(r), 7, 0.1) for r in val)


def test_validation_fraction_needs_an_output(tmp_path):
    with pytest.raises(UserError, match="no validation_output is set"):
        prepare(str(write_jsonl(tmp_path / "r.jsonl", _rows(3))), str(tmp_path / "o.jsonl"), validation_fraction=0.1)


# ------------------------------------------------------------------- inputs, manifest, recipe
def test_parquet_json_array_and_jsonl_named_json_inputs(tmp_path):
    import datasets

    rows = _rows(4)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "raw.parquet"))
    (tmp_path / "array.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "lines.json"))  # the seed's last step writes JSON lines
    for name in ("raw.parquet", "array.json", "lines.json"):
        out = tmp_path / f"{name}.out.jsonl"
        prepare(str(tmp_path / name), str(out))
        assert read_jsonl(out) == rows, name


def test_second_run_is_skipped_until_input_or_settings_change(tmp_path, capsys, monkeypatch):
    raw = write_jsonl(tmp_path / "raw.jsonl", _rows(10))
    out = tmp_path / "out.jsonl"
    prepare(str(raw), str(out))
    inode = out.stat().st_ino
    calls = []
    real = formats._convert
    monkeypatch.setattr(formats, "_convert", lambda *a: calls.append(1) or real(*a))
    prepare(str(raw), str(out))
    assert calls == [] and out.stat().st_ino == inode and "up to date" in capsys.readouterr().out
    prepare(str(raw), str(out), split_seed=99, validation_fraction=0.5, validation_output=str(tmp_path / "val.jsonl"))
    assert calls == [1]
    write_jsonl(raw, _rows(11))
    prepare(str(raw), str(out), split_seed=99, validation_fraction=0.5, validation_output=str(tmp_path / "val.jsonl"))
    assert calls == [1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.lock", "out.jsonl.manifest.json", "raw.jsonl", "val.jsonl"]


def test_recipe_form(tmp_path, capsys):
    raw = write_jsonl(tmp_path / "orca.jsonl", [{"system": "", "question": "q", "chosen": "a", "rejected": "b"}])
    out = tmp_path / "train.jsonl"
    recipe = str(REPO_ROOT / "recipes" / "llama3-8b-dpo.yaml")
    rc = cli.main(["prepare-data", recipe, f"runner.prepare_data={{input: {raw}, output: {out}, format: orca}}"])
    assert rc == 0 and read_jsonl(out)[0]["chosen"] == "a<|im_end|>\n"
    assert cli.main(["prepare-data", recipe]) == 0  # prepare_data: null in the shipped recipe
    assert "nothing to convert" in capsys.readouterr().out
