"""Read preference rows (prompt/chosen/rejected) from jsonl, json, parquet or arrow, and tokenize them.

Why we scan json/jsonl ourselves instead of handing the file to `datasets`: a bad row in a
100k-row file must be reported by its line number, and optionally skipped, rather than surfacing
as a pyarrow error about a batch. Parquet and arrow have no lines; their errors name the row index.

Each row gets a stable id: its 0-based index among the rows of the source (blank lines are not
rows; invalid rows still use up their index). Reference log-probs and metrics are keyed by it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

from recipe_runner.errors import UserError

FIELDS = ("prompt", "chosen", "rejected")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TABLE_SUFFIXES = (".parquet", ".arrow")
SKIP_HINT = "set `runner.data.skip_invalid: true` in the recipe to skip such rows and count them"


@dataclass
class DataReport:
    """What happened to the rows of one data file, for the run log and for error messages."""

    path: str = ""
    rows_read: int = 0
    rows_kept: int = 0
    dropped_no_response: int = 0
    dropped_ids: list[int] = field(default_factory=list)
    skipped_invalid: dict[str, list[int]] = field(default_factory=dict)  # reason -> line numbers
    location: str = "line"  # "line" (1-based, json/jsonl) or "row" (0-based index, parquet/arrow)
    prompts_truncated: int = 0
    responses_truncated: int = 0

    @property
    def invalid_count(self) -> int:
        return sum(len(v) for v in self.skipped_invalid.values())

    def summary(self) -> str:
        parts = [f"{self.path}: {self.rows_read} rows read, {self.rows_kept} kept"]
        if self.skipped_invalid:
            reasons = "; ".join(
                f"{reason}: {len(where)} ({self.location}s {_first(where)})"
                for reason, where in sorted(self.skipped_invalid.items())
            )
            parts.append(f"{self.invalid_count} invalid rows skipped ({reasons})")
        if self.dropped_no_response:
            parts.append(
                f"{self.dropped_no_response} dropped with no answer tokens left after truncation "
                f"(ids {_first(self.dropped_ids)})"
            )
        if self.prompts_truncated or self.responses_truncated:
            parts.append(
                f"truncated: {self.prompts_truncated} prompts, {self.responses_truncated} pairs' answers"
            )
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> "DataReport":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _first(numbers: list[int], n: int = 5) -> str:
    shown = ", ".join(str(x) for x in numbers[:n])
    return shown + (", ..." if len(numbers) > n else "")


def row_problem(row: object) -> tuple[str, str] | None:
    """(reason key, detail) for an unusable row, or None when it is a valid preference pair."""
    if not isinstance(row, dict):
        return "not an object", f"expected a JSON object with {', '.join(FIELDS)}, got {type(row).__name__}"
    for name in FIELDS:
        if name not in row or row[name] is None:
            return "missing field", f"field {name!r} is missing (present: {', '.join(map(str, row)) or 'none'})"
        if not isinstance(row[name], str):
            return "not a string", f"field {name!r} is {type(row[name]).__name__}, not a string"
        if not row[name].strip():
            return "empty field", f"field {name!r} is empty"
    return None


def data_files(path: str) -> list[str]:
    """The data files behind a path: the file itself, or the supported files of a directory (sorted)."""
    if not os.path.exists(path):
        raise UserError(f"data path not found: {path}. Check data.train_dir / data.val_dir, or run `recipe-runner fetch`.")
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path)
            if f.lower().endswith(JSON_SUFFIXES + TABLE_SUFFIXES) and not f.startswith(".")
        )
        if not files:
            raise UserError(f"no .jsonl/.json/.parquet/.arrow files in directory {path}.")
        return files
    if not path.lower().endswith(JSON_SUFFIXES + TABLE_SUFFIXES):
        raise UserError(f"unsupported data file {path}: use .jsonl, .json, .parquet or .arrow with fields {', '.join(FIELDS)}.")
    return [path]


def _json_records(path: str) -> Iterator[tuple[int, object | None, str | None]]:
    """(1-based line, parsed value or None, JSON error or None) for each non-blank line or array item."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        # A JSON array (what `json.dump(list)` writes). Decode it item by item to keep line numbers.
        decoder = json.JSONDecoder()
        pos = len(text) - len(stripped) + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. "
                                "Fix the file (a JSON array cannot be read past a syntax error).") from None
            yield line, value, None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as e:
            yield number, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _table_records(path: str) -> Iterator[tuple[int, object | None, str | None]]:
    """(0-based row index, row dict, None) for parquet/arrow, read through `datasets`."""
    import datasets

    builder = "parquet" if path.lower().endswith(".parquet") else "arrow"
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a "Generating train split" bar per file only clutters the run log
    with tempfile.TemporaryDirectory(prefix="recipe-runner-ds-") as cache:
        try:
            ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache, keep_in_memory=True)
        except Exception as e:  # pyarrow raises many types for a corrupt file
            raise UserError(f"{path}: cannot read as {builder}: {e}") from None
        finally:
            if bars:
                datasets.enable_progress_bars()
        columns = [c for c in FIELDS if c in ds.column_names]
        ds = ds.select_columns(columns) if columns else ds
        for index, row in enumerate(ds):
            yield index, row, None


def read_preference_rows(
    path: str, *, dev_choose_samples: int | None = None, skip_invalid: bool = False
) -> tuple[list[dict], DataReport]:
    """Rows {"id", "prompt", "chosen", "rejected"} of a data file (or directory of files).

    An invalid row raises UserError naming the file and line (row index for parquet/arrow), unless
    skip_invalid, in which case it is counted by reason in the report. `dev_choose_samples: n`
    keeps the first n valid rows and stops reading there.
    """
    files = data_files(path)
    report = DataReport(path=path)
    rows: list[dict] = []
    next_id = 0
    for file in files:
        if dev_choose_samples is not None and len(rows) >= dev_choose_samples:
            break
        is_json = file.lower().endswith(JSON_SUFFIXES)
        report.location = "line" if is_json else "row"
        records = _json_records(file) if is_json else _table_records(file)
        for where, value, error in records:
            if dev_choose_samples is not None and len(rows) >= dev_choose_samples:
                break
            row_id, next_id = next_id, next_id + 1
            report.rows_read += 1
            if error is not None:
                reason, detail = "invalid JSON", error
            else:
                problem = row_problem(value)
                reason, detail = problem if problem else (None, None)
            if reason is not None:
                if not skip_invalid:
                    place = f"line {where}" if is_json else f"row {where} (0-based)"
                    raise UserError(f"{file}, {place}: {detail}. Fix the row, or {SKIP_HINT}.")
                report.skipped_invalid.setdefault(reason, []).append(where)
                continue
            rows.append({"id": row_id, "prompt": value["prompt"], "chosen": value["chosen"], "rejected": value["rejected"]})
    report.rows_kept = len(rows)
    if not rows:
        detail = f" ({report.summary()})" if report.rows_read else ""
        raise UserError(f"no usable preference rows in {path}{detail}; each row needs non-empty string fields {', '.join(FIELDS)}.")
    return rows, report


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A Hugging Face tokenizer from a local directory, with a clear error when it is missing."""
    if not path or not os.path.isdir(path):
        raise UserError(
            f"tokenizer directory not found: {path!r}. Point data.tokenizer.type at a directory with "
            "tokenizer.json / tokenizer_config.json (for example the model directory), or run `recipe-runner fetch`."
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {path}: {e}") from None


def load_tokenized(
    path: str,
    tokenizer,
    *,
    seq_length: int,
    max_prompt_length: int,
    truncation_mode: str,
    dev_choose_samples: int | None = None,
    skip_invalid: bool = False,
    cache_dir: str | None = None,
) -> tuple[list[dict], DataReport]:
    """Tokenized examples {"id", "chosen_input_ids", "chosen_labels", "rejected_input_ids",
    "rejected_labels"} (lists of ints) and the report; cached under cache_dir when given."""
    from recipe_runner.data import cache as cache_mod

    settings = {
        "seq_length": int(seq_length), "max_prompt_length": int(max_prompt_length),
        "truncation_mode": truncation_mode, "dev_choose_samples": dev_choose_samples,
        "skip_invalid": bool(skip_invalid),
    }

    def build() -> tuple[list[dict], DataReport]:
        return tokenize_rows(path, tokenizer, **settings)

    if cache_dir is None:
        return build()
    return cache_mod.cached(cache_dir, path, tokenizer, settings, build)


def tokenize_rows(
    path: str, tokenizer, *, seq_length: int, max_prompt_length: int, truncation_mode: str,
    dev_choose_samples: int | None, skip_invalid: bool, chunk: int = 4096,
) -> tuple[list[dict], DataReport]:
    """Read and tokenize without caching: chunks of rows go to the tokenizer as batches."""
    from recipe_runner.data.tokenize import check_settings, tokenize_pairs

    check_settings(seq_length, max_prompt_length, truncation_mode)
    rows, report = read_preference_rows(path, dev_choose_samples=dev_choose_samples, skip_invalid=skip_invalid)
    examples: list[dict] = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        results = tokenize_pairs(
            tokenizer, [r["prompt"] for r in part], [r["chosen"] for r in part], [r["rejected"] for r in part],
            seq_length=seq_length, max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
        )
        for row, tok in zip(part, results):
            if tok is None:
                report.dropped_no_response += 1
                report.dropped_ids.append(row["id"])
                continue
            report.prompts_truncated += tok["prompt_truncated"]
            report.responses_truncated += tok["response_truncated"]
            examples.append({
                "id": row["id"],
                "chosen_input_ids": tok["chosen_input_ids"], "chosen_labels": tok["chosen_labels"],
                "rejected_input_ids": tok["rejected_input_ids"], "rejected_labels": tok["rejected_labels"],
            })
    report.rows_kept = len(examples)
    if not examples:
        raise UserError(f"no pair of {path} has answer tokens left after truncation ({report.summary()}); "
                        "raise data.seq_length or lower max_prompt_length.")
    return examples, report
