"""Cache of tokenized data: tokenize 10^5 rows once, reuse on every restart and every rank.

The key covers everything the tokens depend on: the data files' content (sha256, not mtime, so a
copy or a touch does not invalidate and an in-place edit does), the tokenizer (its serialized
vocabulary, merges, normalizer and special tokens), the settings, and CODE_VERSION, which must be
bumped whenever tokenize.py changes what it produces. A changed input gives a new file name; the
old file stays valid for the old inputs.

Format: one .npz per key (flat int32 token arrays + offsets + prompt lengths, the report as JSON
bytes), loaded with allow_pickle=False. Written to a temp name and renamed, under a file lock so
that ranks sharing a cache directory tokenize once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Callable

import numpy as np

from recipe_runner.data.dataset import DataReport, data_files
from recipe_runner.data.tokenize import IGNORE_INDEX
from recipe_runner.files import sha256_file as file_sha256

CODE_VERSION = 1  # bump when tokenization output changes for the same inputs


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the full tokenizer.json of a fast tokenizer (else the
    vocabulary), plus the special token ids that tokenize.py adds."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Truncation/padding are call-time state (tokenizer(...) and encode_texts switch them off);
        # leaving them out keeps the fingerprint the same before and after a tokenization.
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    specials = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    h.update(json.dumps(specials).encode("utf-8"))
    return h.hexdigest()


def cache_key(path: str, tokenizer, settings: dict) -> str:
    material = {
        "data": [file_sha256(f) for f in data_files(path)],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings,
        "code_version": CODE_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode("utf-8")).hexdigest()


def cache_file(cache_dir: str, path: str, key: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(path)))[:60]
    return os.path.join(cache_dir, f"tokenized-{stem}-{key[:24]}.npz")


def save(file: str, examples: list[dict], report: DataReport) -> None:
    arrays: dict[str, np.ndarray] = {"ids": np.array([e["id"] for e in examples], dtype=np.int64)}
    for side in ("chosen", "rejected"):
        seqs = [e[f"{side}_input_ids"] for e in examples]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        arrays[f"{side}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays[f"{side}_tokens"] = np.array([t for s in seqs for t in s], dtype=np.int32)
        arrays[f"{side}_prompt_lengths"] = np.array(
            [sum(1 for x in e[f"{side}_labels"] if x == IGNORE_INDEX) for e in examples], dtype=np.int64
        )
    arrays["report"] = np.frombuffer(json.dumps(report.to_dict()).encode("utf-8"), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(file), prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(file: str) -> tuple[list[dict], DataReport]:
    with np.load(file, allow_pickle=False) as z:
        ids = z["ids"].tolist()
        sides = {}
        for side in ("chosen", "rejected"):
            sides[side] = (z[f"{side}_tokens"].tolist(), z[f"{side}_offsets"].tolist(), z[f"{side}_prompt_lengths"].tolist())
        report = DataReport.from_dict(json.loads(z["report"].tobytes().decode("utf-8")))
    examples = []
    for i, row_id in enumerate(ids):
        example: dict = {"id": row_id}
        for side, (tokens, offsets, prompt_lengths) in sides.items():
            seq = tokens[offsets[i] : offsets[i + 1]]
            example[f"{side}_input_ids"] = seq
            example[f"{side}_labels"] = [IGNORE_INDEX] * prompt_lengths[i] + seq[prompt_lengths[i] :]
        examples.append(example)
    return examples, report


def cached(
    cache_dir: str, path: str, tokenizer, settings: dict, build: Callable[[], tuple[list[dict], DataReport]]
) -> tuple[list[dict], DataReport]:
    """Load the cached tokenization of (path, tokenizer, settings), building and saving it if absent."""
    from filelock import FileLock

    os.makedirs(cache_dir, exist_ok=True)
    file = cache_file(cache_dir, path, cache_key(path, tokenizer, settings))
    with FileLock(file + ".lock"):
        if os.path.exists(file):
            try:
                examples, report = load(file)
                report.path = path  # same content may have been cached from another location
                return examples, report
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache file is rebuilt, never trusted
        examples, report = build()
        save(file, examples, report)
        return examples, report
