"""`recipe-runner prepare-data`: raw preference data -> prompt/chosen/rejected jsonl (+ validation).

    recipe-runner prepare-data RECIPE [key=value ...]          # runner.prepare_data
    recipe-runner prepare-data --input F --output F [--format orca|fields|hh|preference]
        [--field prompt=question ...] [--chat-template --tokenizer DIR]
        [--validation-fraction 0.05 --validation-output F] [--split-seed N]

Rows go through `templates` (one pure function per format), land in train or validation by a
seeded hash of the converted row (so the split does not depend on row order, and duplicates
stay on one side), and are written through temp files renamed at the end. A report counts rows
read, written and skipped, with the reason and the first line numbers of each skip. A manifest
beside the output (input sha256 + settings + outputs' sha256) makes a re-run with the same
inputs a no-op, which is what an init container that runs on every pod start needs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from recipe_runner.errors import UserError
from recipe_runner.prepare.manifest import list_files, read_manifest, sha256_file
from recipe_runner.prepare.rows import BadRow, read_rows
from recipe_runner.prepare.templates import Renderer, SkipRow, converter
from recipe_runner.prepare.transfer import atomic_write_text, exclusive, make_parent

FORMAT = "recipe-runner-prepare-data/1"
SHOW_LOCATIONS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML whose runner.prepare_data is run")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe")
    parser.add_argument("--input", help="raw data: .jsonl, .json, .parquet, .arrow or a datasets directory")
    parser.add_argument("--output", help="the training jsonl written")
    parser.add_argument("--format", default="preference", choices=["preference", "orca", "fields", "hh"])
    parser.add_argument("--field", action="append", default=[], metavar="NAME=COLUMN",
                        help="read NAME (prompt, chosen, rejected, system, question) from COLUMN (repeatable)")
    parser.add_argument("--chat-template", action="store_true", help="render with the tokenizer's chat template")
    parser.add_argument("--tokenizer", help="tokenizer directory for --chat-template")
    parser.add_argument("--validation-fraction", type=float, default=0.0)
    parser.add_argument("--validation-output", help="the validation jsonl written when the fraction is > 0")
    parser.add_argument("--split-seed", type=int, default=1234)
    parser.add_argument("--strict", action="store_true", help="fail (exit 2) when any row is skipped")
    parser.add_argument("--force", action="store_true", help="convert again even when the manifest matches")


def run(args: argparse.Namespace) -> int:
    if args.input or args.output:
        if args.recipe:
            raise UserError("give either a RECIPE or --input/--output, not both")
        if not (args.input and args.output):
            raise UserError("--input and --output go together")
        fields = {}
        for item in args.field:
            name, sep, column = item.partition("=")
            if not sep or not name or not column:
                raise UserError(f"--field {item!r}: write NAME=COLUMN, e.g. --field prompt=question")
            fields[name] = column
        cfg = {"input": args.input, "output": args.output, "format": args.format, "fields": fields or None,
               "chat_template": args.chat_template, "tokenizer": args.tokenizer,
               "validation_fraction": args.validation_fraction, "validation_output": args.validation_output,
               "split_seed": args.split_seed}
    elif args.recipe:
        cfg = recipe_settings(args.recipe, args.overrides)
        if cfg is None:
            print(f"prepare-data: {args.recipe} has runner.prepare_data: null; nothing to convert")
            return 0
    else:
        raise UserError("nothing to convert: give a RECIPE (its runner.prepare_data) or --input F --output F")
    prepare(**cfg, strict=args.strict, force=args.force)
    return 0


def recipe_settings(recipe_path: str, overrides: list[str]) -> dict[str, Any] | None:
    from recipe_runner.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    section = recipe.runner.prepare_data
    if section is None:
        return None
    cfg = section.model_dump()
    if cfg["chat_template"] and not cfg["tokenizer"]:
        cfg["tokenizer"] = recipe.data.tokenizer.type  # the run's own tokenizer renders the template
    return cfg


def prepare(input: str, output: str, format: str = "preference", fields: dict[str, str] | None = None,
            chat_template: bool = False, tokenizer: str | None = None, validation_fraction: float = 0.0,
            validation_output: str | None = None, split_seed: int = 1234, strict: bool = False,
            force: bool = False) -> dict[str, Any]:
    """Convert `input` into `output` (and `validation_output`); returns the report as a dict."""
    in_path, out_path = Path(input).expanduser(), Path(output).expanduser()
    val_path = Path(validation_output).expanduser() if validation_output else None
    fraction = float(validation_fraction or 0.0)
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"validation_fraction must be in [0, 1), got {fraction}")
    if fraction > 0 and val_path is None:
        raise UserError(f"validation_fraction is {fraction} but no validation_output is set (e.g. data.val_dir)")
    if fraction == 0 and val_path is not None:
        print(f"prepare-data: validation_fraction is 0; {val_path} is not written", file=sys.stderr)
        val_path = None
    if out_path.is_dir() or (val_path and val_path.is_dir()):
        raise UserError(f"output {out_path if out_path.is_dir() else val_path} is a directory; give a .jsonl file path")
    render = Renderer(_load_tokenizer(tokenizer)) if chat_template else None
    convert = converter(format, fields, render)
    settings = {"format": format, "fields": fields or None, "chat_template": bool(chat_template),
                "chat_template_sha256": _sha(render.tokenizer.chat_template) if render else None,
                "validation_fraction": fraction, "split_seed": int(split_seed), "strict": bool(strict), "version": FORMAT}

    make_parent(out_path)
    with exclusive(out_path, "prepare-data"):
        input_sha = _input_sha256(in_path)
        mpath = out_path.with_name(out_path.name + ".manifest.json")
        old = read_manifest(mpath, FORMAT)
        if not force and _up_to_date(old, in_path, input_sha, settings, out_path, val_path):
            print(f"prepare-data: {out_path} is up to date with {in_path} (manifest {mpath.name}); skipping")
            return old["report"]
        tmp_train = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
        tmp_val = val_path.with_name(f".{val_path.name}.tmp-{os.getpid()}") if val_path else None
        try:
            report = _convert(in_path, tmp_train, tmp_val, convert, fraction, int(split_seed))
            print(format_report(report, in_path, format, out_path, val_path))
            if report["written_train"] == 0:
                raise UserError(f"prepare-data: no training rows from {in_path} (format {format}); see the reasons above")
            if strict and report["skipped"]:
                raise UserError(f"prepare-data: {report['skipped']} row(s) skipped and --strict is set; nothing written")
            os.replace(tmp_train, out_path)
            if val_path and tmp_val:
                os.replace(tmp_val, val_path)
        finally:
            for tmp in (tmp_train, tmp_val):
                if tmp is not None and tmp.exists():
                    tmp.unlink()
        outputs = {"train": _describe(out_path)} | ({"validation": _describe(val_path)} if val_path else {})
        atomic_write_text(mpath, json.dumps({"format": FORMAT, "input": str(in_path), "input_sha256": input_sha,
                                             "settings": settings, "outputs": outputs, "report": report},
                                            indent=2, sort_keys=True) + "\n")
    return report


def split_is_validation(row: dict[str, str], seed: int, fraction: float) -> bool:
    """A seeded hash of the converted row: stable under reordering, duplicates on one side."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(json.dumps([seed, row["prompt"], row["chosen"], row["rejected"]]).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def _convert(in_path: Path, train_path: Path, val_path: Path | None, convert: Any, fraction: float, seed: int) -> dict[str, Any]:
    """Convert every row into the (temporary) train and validation files; return the report."""
    skipped: dict[str, list[str]] = defaultdict(list)
    counts = {"read": 0, "written_train": 0, "written_validation": 0}
    if val_path:
        val_path.parent.mkdir(parents=True, exist_ok=True)
    with open(train_path, "w", encoding="utf-8") as train_f, \
            (open(val_path, "w", encoding="utf-8") if val_path else open(os.devnull, "w")) as val_f:
        for where, raw in read_rows(in_path):
            counts["read"] += 1
            try:
                if isinstance(raw, BadRow):
                    raise SkipRow(raw.reason)
                row = convert(raw)
            except SkipRow as e:
                skipped[str(e)].append(where)
                continue
            line = json.dumps(row, ensure_ascii=False) + "\n"
            if split_is_validation(row, seed, fraction):
                val_f.write(line)
                counts["written_validation"] += 1
            else:
                train_f.write(line)
                counts["written_train"] += 1
    return {**counts, "skipped": sum(len(v) for v in skipped.values()),
            "skipped_by_reason": {reason: {"count": len(w), "first": w[:SHOW_LOCATIONS]} for reason, w in skipped.items()}}


def format_report(report: dict[str, Any], in_path: Path, fmt: str, out_path: Path, val_path: Path | None) -> str:
    lines = [f"prepare-data: read {report['read']} rows from {in_path} (format {fmt})",
             f"  train:      {report['written_train']} rows -> {out_path}"]
    if val_path:
        lines.append(f"  validation: {report['written_validation']} rows -> {val_path}")
    lines.append(f"  skipped:    {report['skipped']} rows")
    for reason, info in sorted(report["skipped_by_reason"].items(), key=lambda kv: -kv[1]["count"]):
        more = ", ..." if info["count"] > len(info["first"]) else ""
        lines.append(f"    {reason}: {info['count']} ({', '.join(info['first'])}{more})")
    return "\n".join(lines)


def _load_tokenizer(path: str | None) -> Any:
    if not path:
        raise UserError("chat_template needs a tokenizer directory (prepare_data.tokenizer, data.tokenizer.type, or --tokenizer)")
    if not Path(path).is_dir():
        raise UserError(f"tokenizer {path}: no such directory (fetch the model first)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "chat_template", None):
        raise UserError(f"tokenizer {path} has no chat_template (base models usually have none); "
                        "use chat_template: false (the seed's ChatML strings) or an instruct model's tokenizer")
    return tok


def _input_sha256(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    if not path.exists():
        raise UserError(f"input {path}: no such file or directory")
    h = hashlib.sha256()
    for rel in list_files(path):
        h.update(f"{rel.as_posix()}\0{sha256_file(path / rel)}\n".encode())
    return h.hexdigest()


def _sha(text: Any) -> str:
    return hashlib.sha256(str(text).encode()).hexdigest()


def _describe(path: Path) -> dict[str, Any]:
    return {"path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}


def _up_to_date(old: dict[str, Any] | None, in_path: Path, input_sha: str, settings: dict[str, Any],
                out_path: Path, val_path: Path | None) -> bool:
    if not old or old.get("input_sha256") != input_sha or old.get("settings") != settings:
        return False
    expected = {"train": out_path} | ({"validation": val_path} if val_path else {})
    if set(old.get("outputs", {})) != set(expected):
        return False
    for name, path in expected.items():
        rec = old["outputs"][name]
        if rec.get("path") != str(path) or not path.is_file() or path.stat().st_size != rec.get("size") \
                or sha256_file(path) != rec.get("sha256"):
            return False
    return True
