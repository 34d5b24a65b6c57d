"""Read raw dataset rows from jsonl, json, parquet, arrow or a saved `datasets` directory.

JSON lines are parsed here, one line at a time, rather than by `datasets`: a single malformed
line makes `datasets` reject the whole file without saying where, and Arrow's schema inference
fails on a column that is a string in one row and a list in another. Reading each line
ourselves lets the report name the line of every bad row and skip just that row. Parquet,
Arrow and saved datasets are typed already and go through `datasets`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterator

from recipe_runner.errors import UserError


class BadRow:
    """Stands in for a row that could not be parsed; `reason` goes into the report."""

    def __init__(self, reason: str):
        self.reason = reason


def read_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, row): where is "line N" (jsonl) or "row N"; row is a dict or a BadRow."""
    if not path.exists():
        raise UserError(f"input {path}: no such file or directory")
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _datasets_rows(path, "dir")
    elif suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix in (".parquet", ".arrow"):
        yield from _datasets_rows(path, suffix[1:])
    else:
        raise UserError(f"input {path}: unknown file type {suffix or '(none)'}; use .jsonl, .json, .parquet, .arrow "
                        "or a directory written by datasets.save_to_disk")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    yield f"line {number}", BadRow("malformed JSON")
                    continue
                yield f"line {number}", row if isinstance(row, dict) else BadRow("not a JSON object")
        except UnicodeDecodeError as e:
            raise UserError(f"input {path}: not UTF-8 text (byte {e.start} of a line): {e.reason}") from None


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON array of objects, {"<split>": [...]}, or columns {"a": [...], "b": [...]}.

    `datasets.Dataset.to_json` (the seed's last step) writes JSON lines even into a `.json`
    file, so "extra data" after the first value means: read it as JSON lines.
    """
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            yield from _jsonl_rows(path)
            return
        raise UserError(f"input {path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists:
            data = lists[0]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data, values)) for values in zip(*data.values())]
        else:
            data = [data]
    if not isinstance(data, list):
        raise UserError(f"input {path}: expected a JSON array of objects")
    for number, row in enumerate(data, 1):
        yield f"row {number}", row if isinstance(row, dict) else BadRow("not a JSON object")


def _datasets_rows(path: Path, kind: str) -> Iterator[tuple[str, Any]]:
    import datasets

    with tempfile.TemporaryDirectory(prefix="prepare-data-cache-") as cache:
        if kind == "dir":
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise UserError(f"input {path}: a DatasetDict without a 'train' split (it has {', '.join(ds)})")
                ds = ds["train"]
        elif kind == "arrow":
            ds = datasets.Dataset.from_file(str(path))
        else:
            ds = datasets.Dataset.from_parquet(str(path), cache_dir=cache)
        for number, row in enumerate(ds, 1):
            yield f"row {number}", row
