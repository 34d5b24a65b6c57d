"""`recipe-runner compile RECIPE [key=value ...]`: fill the Neuron compile cache ahead of time.

The seed's COMPILE=1 flow, as a verb: a few training steps of the same recipe run under
`neuron_parallel_compile`, which extracts every graph and compiles them in parallel into the
compile cache; the real run then only loads NEFFs. The compile run changes nothing that shapes
a graph: only the step count, checkpoints and TensorBoard off, a throw-away log dir and data
cache (the reference log-probs a compile run computes are fake zeros and must never be reused),
and fewer training rows (the number of rows shapes no graph).

A marker in the cache (`<cache>/recipe-runner/<key>.json`) records a finished compile; the key
hashes the recipe keys that shape graphs plus the neuronx-cc and torch-xla versions, so a
re-run is instant and any change that needs new graphs compiles again. Remote caches
(compiler_cache_url: s3://...) keep no marker: neuron_parallel_compile itself skips graphs the
cache holds. Elsewhere (no Neuron compiler) the verb prints what it would do and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from recipe_runner.backends.neuron_env import compile_cache_dir, export_lines, is_remote_cache, neuron_env
from recipe_runner.errors import UserError

DEFAULT_STEPS = 3  # step 1 and 2 differ (gradient buffers, optimizer state), 3 is steady; validation runs at 0 and the end


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for `train`")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps to trace (default {DEFAULT_STEPS})")
    p.add_argument("--force", action="store_true", help="compile even when the cache marker says it is done")
    p.add_argument("--dry-run", action="store_true", help="print the command, environment and marker; run nothing")
    p.add_argument("--print-env", action="store_true",
                   help="print the recipe's Neuron environment as `export` lines (eval them before torchrun) and exit")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def toolchain() -> dict[str, str]:
    return {"neuronx-cc": _version("neuronx-cc"), "torch-xla": _version("torch-xla"), "torch": _version("torch"),
            "recipe-runner": _version("recipe-runner")}


def shape_keys(recipe) -> dict:
    """The recipe values that decide which graphs exist (and nothing that does not, so a new
    learning rate or dataset path does not recompile)."""
    r, ds, m, t = recipe, recipe.distributed_strategy, recipe.model, recipe.trainer
    config = Path(m.model_config_path)
    config = config / "config.json" if config.is_dir() else config
    arch = json.loads(config.read_text()) if config.is_file() else {"missing": str(config)}
    al = r.alignment
    return {
        "model_config": arch, "seq_length": r.data.seq_length, "micro_batch_size": r.data.micro_batch_size,
        "devices": t.devices, "num_nodes": t.num_nodes, "gradient_clip": bool(t.gradient_clip_val),
        "parallel": ds.model_dump(), "qkv_linear": m.qkv_linear, "fuse_qkv": m.fuse_qkv,
        "activations_checkpoint_granularity": m.activations_checkpoint_granularity, "fusions": m.fusions.model_dump(),
        "rope_theta": m.rope_theta, "max_position_embeddings": m.max_position_embeddings,
        "optimizer": m.optim.name, "precision": r.precision.model_dump(), "compiler_flags": r.compiler_flags,
        "algorithm": r.algorithm, "precompute_ref_log_probs": getattr(al, "precompute_ref_log_probs", None),
        "nll_scope": getattr(al, "nll_scope", None), "validation": bool(r.data.val_dir),
        "log_parameter_norm": r.exp_manager.log_parameter_norm,
    }


def compile_key(recipe, tools: dict[str, str] | None = None) -> str:
    blob = json.dumps({"shape": shape_keys(recipe), "tools": tools or toolchain()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def marker_path(recipe, key: str) -> Path | None:
    cache = compile_cache_dir(recipe)
    return None if is_remote_cache(cache) else Path(cache) / "recipe-runner" / f"{key}.json"


def train_command(recipe_path: str, overrides: list[str], recipe, *, steps: int, log_dir: str) -> list[str]:
    """`recipe-runner train` (under torchrun for several devices) with the compile-run overrides."""
    t = recipe.trainer
    rows = max(recipe.data.global_batch_size * steps, recipe.data.global_batch_size)
    train = ["train", recipe_path, *overrides, f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
             "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
             "exp_manager.resume_if_exists=false", f"exp_manager.explicit_log_dir={log_dir}",
             f"runner.cache_dir={log_dir}/cache", f"data.dev_choose_samples={rows}", "runner.device=xla"]
    if t.devices * t.num_nodes == 1:
        return [sys.executable, "-m", "recipe_runner.cli", *train]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(t.devices)]
    if t.num_nodes > 1:  # the same rendezvous as training (set by the Job / train.sh)
        launcher += ["--nnodes", str(t.num_nodes), "--node_rank", os.environ.get("NODE_RANK", "0"),
                     "--master_addr", os.environ.get("MASTER_ADDR", "localhost"),
                     "--master_port", os.environ.get("MASTER_PORT", "41000")]
    return [*launcher, "-m", "recipe_runner.cli", *train]


def on_neuron() -> bool:
    return (shutil.which("neuron_parallel_compile") is not None and importlib.util.find_spec("torch_xla") is not None
            and shutil.which("neuronx-cc") is not None)


def write_marker(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from recipe_runner.recipe import load_recipe

    if "=" in args.recipe:
        raise UserError(f"{args.recipe!r} looks like an override: put the recipe path first")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: trace at least 1 training step")
    recipe = load_recipe(args.recipe, list(args.overrides))
    env = neuron_env(recipe, base_flags=os.environ.get("NEURON_CC_FLAGS", ""))
    if args.print_env:
        print(export_lines(env), end="")
        return 0
    tools = toolchain()
    key = compile_key(recipe, tools)
    marker = marker_path(recipe, key)
    log_dir = tempfile.mkdtemp(prefix="recipe-runner-compile-") if not args.dry_run else "<temporary dir>"
    cmd = ["neuron_parallel_compile", *train_command(args.recipe, list(args.overrides), recipe, steps=args.steps,
                                                     log_dir=log_dir)]
    where = f"compile cache {compile_cache_dir(recipe)}"
    if marker is not None and marker.is_file() and not args.force:
        print(f"{where} already holds this recipe's graphs (marker {marker}, key {key}): nothing to compile; "
              f"--force compiles again")
        _cleanup(log_dir, args.dry_run)
        return 0
    if args.dry_run or not on_neuron():
        why = "dry run" if args.dry_run else "no Neuron compiler here (neuron_parallel_compile, neuronx-cc, torch_xla)"
        print(f"{why}: would run, with the recipe's Neuron environment:")
        print("".join(f"  {k}={shlex.quote(v)}\n" for k, v in sorted(env.items())), end="")
        print("  " + " ".join(shlex.quote(c) for c in cmd))
        print(f"and then record {marker or '(no marker: remote cache)'} (key {key})")
        _cleanup(log_dir, args.dry_run)
        return 0
    print(f"compiling {args.recipe} into {where} ({args.steps} traced steps; key {key})", flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **env, "COMPILE": "1"})
    _cleanup(log_dir, False)
    if proc.returncode != 0:
        raise UserError(f"neuron_parallel_compile exited with {proc.returncode}: see the compiler log above "
                        f"(failed graphs are listed there); fix and re-run `recipe-runner compile`",
                        exit_code=proc.returncode)
    if marker is not None:
        write_marker(marker, {"key": key, "recipe": os.path.abspath(args.recipe), "overrides": list(args.overrides),
                              "tools": tools, "shape": shape_keys(recipe),
                              "created": datetime.datetime.now(datetime.timezone.utc).isoformat()})
        print(f"compiled; marker {marker}")
    return 0


def _cleanup(log_dir: str, dry_run: bool) -> None:
    if not dry_run:
        shutil.rmtree(log_dir, ignore_errors=True)
