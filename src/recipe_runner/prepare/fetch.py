"""`recipe-runner fetch`: bring the recipe's data and model onto the shared volume, once.

    recipe-runner fetch RECIPE [key=value ...] [--only NAME]   # every entry of runner.sources
    recipe-runner fetch --uri URI --dest PATH [--sha256 HEX] [--revision R]

Runs as the first init container of every training pod, so it must be cheap when repeated and
safe when several pods start together: under a lock on the destination it compares the
source's identity with the manifest left by the last fetch and skips when they match;
otherwise it downloads into a temporary directory next to the destination, checks the sha256
when one is given, moves the result into place and writes the manifest last.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from recipe_runner.errors import UserError
from recipe_runner.prepare import transfer
from recipe_runner.prepare.manifest import (describe_files, list_files, manifest_path, read_manifest,
                                            why_stale, write_manifest)
from recipe_runner.prepare.sources import open_source
from recipe_runner.prepare.transfer import (check_free_space, disk_full_is_user_error, exclusive, human_bytes,
                                            make_parent)

TMP_MARK = ".fetch-tmp-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML whose runner.sources are fetched")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe")
    parser.add_argument("--uri", help="fetch this one source instead of the recipe's: s3://, https://, hf://, file:// or a path")
    parser.add_argument("--dest", help="where --uri goes (a file, or a directory for s3 prefixes and hf repos)")
    parser.add_argument("--sha256", help="expected sha256 of a single-file --uri")
    parser.add_argument("--revision", help="branch, tag or commit of an hf:// --uri")
    parser.add_argument("--only", action="append", metavar="NAME", help="fetch only this recipe source (repeatable)")
    parser.add_argument("--verify", action="store_true", help="re-hash existing files instead of trusting their sizes")
    parser.add_argument("--attempts", type=int, default=transfer.ATTEMPTS, help="attempts per transfer (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    transfer.ATTEMPTS = max(1, args.attempts)
    if args.uri or args.dest:
        if not (args.uri and args.dest):
            raise UserError("--uri and --dest go together")
        if args.recipe:
            raise UserError("give either a RECIPE or --uri/--dest, not both")
        fetch(args.uri, args.dest, sha256=args.sha256, revision=args.revision, verify=args.verify)
        return 0
    if not args.recipe:
        raise UserError("nothing to fetch: give a RECIPE (its runner.sources) or --uri URI --dest PATH")
    entries = recipe_sources(args.recipe, args.overrides)
    if args.only:
        unknown = sorted(set(args.only) - set(entries))
        if unknown:
            raise UserError(f"--only {', '.join(unknown)}: not in runner.sources of {args.recipe} (it has: {', '.join(entries) or 'none'})")
        entries = {k: v for k, v in entries.items() if k in args.only}
    if not entries:
        print(f"fetch: {args.recipe} lists no runner.sources; nothing to do")
        return 0
    for name, entry in entries.items():
        print(f"fetch: [{name}]", flush=True)
        fetch(entry["uri"], entry["dest"], sha256=entry.get("sha256"), revision=entry.get("revision"), verify=args.verify)
    return 0


def recipe_sources(recipe_path: str, overrides: list[str]) -> dict[str, dict[str, Any]]:
    """runner.sources of the recipe as plain dicts."""
    from recipe_runner.recipe import load_recipe

    out = {}
    for name, source in load_recipe(recipe_path, overrides).runner.sources.items():
        if not source.uri or not source.dest:
            raise UserError(f"{recipe_path}: runner.sources.{name} needs both `uri` and `dest`")
        out[name] = source.model_dump()
    return out


def fetch(uri: str, dest: str | os.PathLike, sha256: str | None = None, revision: str | None = None,
          verify: bool = False) -> bool:
    """Make `dest` a complete copy of `uri`. Returns True when it downloaded, False when up to date."""
    if sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise UserError(f"sha256 for {uri} must be 64 hex characters, got {sha256!r}")
    source = open_source(uri, revision)
    if sha256 and source.is_dir:
        raise UserError(f"{uri}: sha256 applies to a single file, but this source is a directory")
    dest_path = Path(dest).expanduser().absolute()
    if not source.is_dir and (str(dest).endswith("/") or dest_path.is_dir()):
        dest_path = dest_path / Path(uri.rstrip("/")).name  # a file into an existing directory
    make_parent(dest_path)
    mpath = manifest_path(dest_path, source.is_dir)

    with exclusive(dest_path, "fetch"):
        _remove_leftovers(dest_path)
        identity = source.identity()
        reason = why_stale(read_manifest(mpath), uri, revision, identity, dest_path, source.is_dir, sha256, verify)
        if reason is None:
            print(f"fetch: {dest_path} is up to date with {uri} (manifest {mpath.name}); skipping", flush=True)
            return False
        print(f"fetch: {uri} -> {dest_path} ({reason})", flush=True)
        _check_dest(dest_path, source.is_dir, mpath)
        check_free_space(dest_path.parent, source.total_size)
        staging = dest_path.parent / f".{dest_path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(3)}"
        staging.mkdir()
        start = time.monotonic()
        try:
            with disk_full_is_user_error(dest_path.parent, source.total_size):
                files = _download_and_install(source, uri, revision, identity, staging, dest_path, mpath, sha256)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    total = sum(f["size"] for f in files)
    print(f"fetch: {dest_path} ready: {len(files)} file(s), {human_bytes(total)} in {time.monotonic() - start:.1f}s", flush=True)
    return True


def _download_and_install(source: Any, uri: str, revision: str | None, identity: dict[str, Any], staging: Path,
                          dest: Path, mpath: Path, sha256: str | None) -> list[dict[str, Any]]:
    if source.is_dir:
        target = staging / "content"
        source.download(target)
        files = describe_files(target, list_files(target))
        if not files:
            raise UserError(f"{uri}: the source holds no files")
        write_manifest(target / mpath.name, uri, revision, identity, files, source.extra)
        if dest.exists():  # swap: the old copy goes into staging, which is removed afterwards
            os.rename(dest, staging / "old")
        os.rename(target, dest)
        return files
    target = staging / dest.name
    source.download(target)
    files = describe_files(staging, [Path(dest.name)])
    if sha256 and files[0]["sha256"] != sha256.lower():
        raise UserError(f"{uri}: checksum mismatch: expected sha256 {sha256.lower()}, got {files[0]['sha256']}. "
                        "The download was removed (nothing was written to the destination). Either the source "
                        "changed or it was corrupted on the way; check `sha256` in the recipe and run again.")
    os.replace(target, dest)
    write_manifest(mpath, uri, revision, identity, files, source.extra)
    return files


def _check_dest(dest: Path, is_dir: bool, mpath: Path) -> None:
    """Refuse to overwrite what fetch did not write (a wrong `dest` must not delete user data)."""
    if is_dir:
        if dest.is_file():
            raise UserError(f"{dest} is a file, but the source is a directory (s3 prefix or hf repo); choose a directory path")
        if dest.is_dir() and any(dest.iterdir()) and not mpath.exists():
            raise UserError(f"{dest} already holds files that fetch did not write (no {mpath.name}); "
                            "remove it or choose another `dest`")
    elif dest.is_dir():
        raise UserError(f"{dest} is a directory, but the source is a single file; give a file path")


def _remove_leftovers(dest: Path) -> None:
    """Temp dirs of fetches that were killed; safe because we hold the destination's lock."""
    for stale in dest.parent.glob(f".{dest.name}{TMP_MARK}*"):
        print(f"fetch: removing the leftovers of an interrupted fetch: {stale}", file=sys.stderr)
        shutil.rmtree(stale, ignore_errors=True)
