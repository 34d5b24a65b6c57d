"""Reading preference files (jsonl, json, parquet, arrow), bad-row messages, skip mode, the cache."""

from __future__ import annotations

import json
import os

import pytest

import recipe_runner.data.tokenize as tokenize_mod
from recipe_runner.data.dataset import load_tokenized, load_tokenizer, read_preference_rows
from recipe_runner.data.tiny import TINY_TOKENIZER, TINY_TRAIN
from recipe_runner.data.tokenize import tokenize_pair
from recipe_runner.errors import UserError

ROWS = [
    {"prompt": "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n",
     "chosen": "Certainly! 2 plus 2 equals 4.<|im_end|>\n", "rejected": "4 lol<|im_end|>\n"},
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " idk", "extra": 1},
    {"prompt": "What sound does a cow make?", "chosen": " A cow says moo.", "rejected": " moo"},
]
SETTINGS = {"seq_length": 64, "max_prompt_length": 32, "truncation_mode": "keep_start"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY_TOKENIZER)


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_rows_get_stable_ids_and_blank_lines_are_not_rows(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), "   ", json.dumps(ROWS[2])])
    rows, report = read_preference_rows(path)
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert rows[1] == {"id": 1, "prompt": "Name a colour.", "chosen": " Blue.", "rejected": " idk"}
    assert (report.rows_read, report.rows_kept, report.skipped_invalid) == (3, 3, {})


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
    rows, _ = read_preference_rows(str(path))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in ROWS]


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "p", "chosen": "c", ', "invalid JSON"),
    ('{"prompt": "p", "chosen": "c"}', "field 'rejected' is missing"),
    ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "field 'chosen' is int, not a string"),
    ('{"prompt": "", "chosen": "c", "rejected": "r"}', "field 'prompt' is empty"),
    ('{"prompt": "p", "chosen": "c", "rejected": "  "}', "field 'rejected' is empty"),
    ('["p", "c", "r"]', "expected a JSON object"),
])
def test_bad_row_names_file_and_line_and_the_skip_option(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(ROWS[0]), "", bad_line, json.dumps(ROWS[2])])
    with pytest.raises(UserError) as e:
        read_preference_rows(path)
    text = str(e.value)
    assert f"{path}, line 3:" in text
    assert message in text
    assert "runner.data.skip_invalid: true" in text


def test_skip_invalid_counts_by_reason_with_line_numbers(tmp_path):
    good = json.dumps(ROWS[0])
    lines = [good, "{oops", good, '{"prompt": "p"}', "not json", good, '{"prompt": "", "chosen": "c", "rejected": "r"}', good]
    path = write_lines(tmp_path / "d.jsonl", lines)
    rows, report = read_preference_rows(path, skip_invalid=True)
    assert [r["id"] for r in rows] == [0, 2, 5, 7]  # invalid rows still use up their index
    assert report.skipped_invalid == {"invalid JSON": [2, 5], "missing field": [4], "empty field": [7]}
    assert (report.rows_read, report.rows_kept, report.invalid_count) == (8, 4, 4)
    summary = report.summary()
    assert "4 invalid rows skipped" in summary and "invalid JSON: 2 (lines 2, 5)" in summary


def test_dev_choose_samples_keeps_the_first_rows(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS] + ["garbage after the first rows"])
    rows, report = read_preference_rows(path, dev_choose_samples=2)
    assert [r["id"] for r in rows] == [0, 1] and report.rows_read == 2


def test_missing_file_and_no_usable_rows_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data path not found"):
        read_preference_rows(str(tmp_path / "nope.jsonl"))
    path = write_lines(tmp_path / "d.jsonl", ["{bad"])
    with pytest.raises(UserError, match="no usable preference rows"):
        read_preference_rows(path, skip_invalid=True)


def test_parquet_input_and_row_index_in_errors(tmp_path):
    import datasets

    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ROWS]).to_parquet(path)
    rows, _ = read_preference_rows(path)
    assert [r["chosen"] for r in rows] == [r["chosen"] for r in ROWS]
    bad = str(tmp_path / "bad.parquet")
    datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "", "rejected": "r"}]).to_parquet(bad)
    with pytest.raises(UserError, match=r"bad.parquet, row 1 \(0-based\): field 'chosen' is empty"):
        read_preference_rows(bad)


@pytest.mark.parametrize("layout", ["stream", "file"])
def test_arrow_input_both_ipc_layouts(tmp_path, layout):
    """NxDT's .arrow path is broken; ours reads what datasets.save_to_disk writes (IPC stream) and
    plain Arrow IPC files."""
    import pyarrow as pa

    table = pa.table({k: [r[k] for r in ROWS] for k in ("prompt", "chosen", "rejected")})
    path = str(tmp_path / "d.arrow")
    with pa.OSFile(path, "wb") as sink:
        writer = (pa.ipc.new_stream if layout == "stream" else pa.ipc.new_file)(sink, table.schema)
        writer.write_table(table)
        writer.close()
    rows, report = read_preference_rows(path)
    assert [r["rejected"] for r in rows] == [r["rejected"] for r in ROWS] and report.rows_kept == 3


def test_directory_of_files_reads_them_in_order(tmp_path):
    write_lines(tmp_path / "a.jsonl", [json.dumps(ROWS[0])])
    write_lines(tmp_path / "b.jsonl", [json.dumps(ROWS[1]), json.dumps(ROWS[2])])
    rows, _ = read_preference_rows(str(tmp_path))
    assert [r["id"] for r in rows] == [0, 1, 2] and rows[2]["chosen"] == ROWS[2]["chosen"]


def test_load_tokenizer_missing_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer directory not found"):
        load_tokenizer(str(tmp_path / "missing"))


def test_load_tokenized_matches_tokenize_pair(tmp_path, tok):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])
    examples, report = load_tokenized(path, tok, **SETTINGS)
    assert [e["id"] for e in examples] == [0, 1, 2]
    for example, row in zip(examples, ROWS):
        expected = tokenize_pair(tok, row["prompt"], row["chosen"], row["rejected"], **SETTINGS)
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert example[key] == expected[key]
    assert examples[0]["chosen_input_ids"][0] == tok.bos_token_id and examples[0]["chosen_input_ids"][-1] == tok.eos_token_id
    assert report.rows_kept == 3 and report.dropped_no_response == 0


def test_pairs_without_answer_tokens_are_dropped_and_counted(tmp_path, tok, monkeypatch):
    real = tokenize_mod.tokenize_pairs

    def drop_second(*args, **kwargs):
        out = real(*args, **kwargs)
        out[1] = None
        return out

    monkeypatch.setattr(tokenize_mod, "tokenize_pairs", drop_second)
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])
    examples, report = load_tokenized(path, tok, **SETTINGS)
    assert [e["id"] for e in examples] == [0, 2]
    assert (report.dropped_no_response, report.dropped_ids, report.rows_kept) == (1, [1], 2)
    assert "1 dropped with no answer tokens" in report.summary()


def test_truncation_counts_are_reported(tok):
    _, report = load_tokenized(TINY_TRAIN, tok, seq_length=24, max_prompt_length=12, truncation_mode="keep_end")
    assert report.prompts_truncated > 0 and report.responses_truncated > 0


def test_cache_is_reused_and_invalidated(tmp_path, tok, monkeypatch):
    calls = []
    real = tokenize_mod.tokenize_pairs
    monkeypatch.setattr(tokenize_mod, "tokenize_pairs", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = str(tmp_path / "cache")
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])

    fresh, fresh_report = load_tokenized(path, tok, **SETTINGS, cache_dir=cache)
    assert len(calls) == 1
    again, again_report = load_tokenized(path, tok, **SETTINGS, cache_dir=cache)
    assert len(calls) == 1, "unchanged inputs must come from the cache"
    assert again == fresh and again_report == fresh_report
    os.utime(path, (1, 1))  # content-keyed: a touch is not a change
    load_tokenized(path, tok, **SETTINGS, cache_dir=cache)
    assert len(calls) == 1

    load_tokenized(path, tok, **{**SETTINGS, "truncation_mode": "keep_end"}, cache_dir=cache)
    assert len(calls) == 2, "settings changed"
    load_tokenized(path, tok, **SETTINGS, cache_dir=cache, dev_choose_samples=2)
    assert len(calls) == 3, "dev_choose_samples changed"

    write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS[:2]])
    changed, _ = load_tokenized(path, tok, **SETTINGS, cache_dir=cache)
    assert len(calls) == 4 and len(changed) == 2, "data changed"

    other = load_tokenizer(TINY_TOKENIZER)
    other.add_tokens(["moo"])
    load_tokenized(path, other, **SETTINGS, cache_dir=cache)
    assert len(calls) == 5, "tokenizer changed"
    load_tokenized(path, load_tokenizer(TINY_TOKENIZER), **SETTINGS, cache_dir=cache)
    assert len(calls) == 5, "an identical tokenizer loaded again shares the cache"
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp-")]


def test_damaged_cache_file_is_rebuilt(tmp_path, tok):
    cache = str(tmp_path / "cache")
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(r) for r in ROWS])
    fresh, _ = load_tokenized(path, tok, **SETTINGS, cache_dir=cache)
    (npz,) = [f for f in os.listdir(cache) if f.endswith(".npz")]
    with open(os.path.join(cache, npz), "wb") as f:
        f.write(b"not a zip")
    again, _ = load_tokenized(path, tok, **SETTINGS, cache_dir=cache)
    assert again == fresh


def test_fast_encoding_path_equals_the_tokenizer_call(tok):
    from recipe_runner.data.tokenize import encode_texts

    texts = [json.loads(line)[k] for line in open(TINY_TRAIN, encoding="utf-8") for k in ("prompt", "chosen")][:200]
    texts += ["<|begin_of_text|>hi<|end_of_text|>", " leading space", "tabs\tand\nnewlines  "]
    assert encode_texts(tok, texts) == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_tokenizer_fingerprint_ignores_call_time_truncation_state():
    from recipe_runner.data.cache import tokenizer_fingerprint

    tok = load_tokenizer(TINY_TOKENIZER)
    before = tokenizer_fingerprint(tok)
    tok.backend_tokenizer.enable_truncation(8)
    tok.backend_tokenizer.enable_padding(length=8)
    assert tokenizer_fingerprint(tok) == before
    tok.add_tokens(["zebra"])
    assert tokenizer_fingerprint(tok) != before
