"""`recipe-runner convert-checkpoint`: Hugging Face Llama <-> NxD tensor/pipeline-parallel layout.

Two forms:
  recipe-runner convert-checkpoint --from hf --to nxd --input HF_DIR --output NXD_DIR --tp-size 32 \\
      --kv-size-multiplier 4 [--pp-size 1] [--config config.json] [--no-save-xser]
  recipe-runner convert-checkpoint --from nxd --to hf --input NXD_DIR --output HF_DIR [--dtype bfloat16]
  recipe-runner convert-checkpoint RECIPE [key=value ...]     (HF -> NxD, settings from the recipe)

Booleans are real flags (`--no-fuse-qkv` means False; NxD's own converter reads `--fuse_qkv False`
as True). NxD -> HF detects tp/pp/kv multiplier/qkv layout from the files; any flag given must
agree with them. The engine is in `nxd_convert`, the layout in `nxd_layout`.
"""

from __future__ import annotations

import argparse

from recipe_runner.errors import UserError
from recipe_runner.prepare.nxd_convert import hf_to_nxd, load_nxd_as_hf_state_dict, nxd_to_hf
from recipe_runner.prepare.nxd_layout import nxd_param_shapes

__all__ = ["add_arguments", "run", "hf_to_nxd", "nxd_to_hf", "load_nxd_as_hf_state_dict", "nxd_param_shapes"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML: convert runner.convert_checkpoint.input -> .output (HF -> NxD)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. distributed_strategy.kv_replicator=4")
    parser.add_argument("--from", dest="src", choices=["hf", "nxd"], help="layout of --input")
    parser.add_argument("--to", dest="dst", choices=["hf", "nxd"], help="layout of --output")
    parser.add_argument("--input", help="HF model directory (or weights file), or NxD checkpoint directory (holding model/)")
    parser.add_argument("--output", help="directory to write; appears complete or not at all")
    parser.add_argument("--config", help="HF config.json (default: the one next to the input)")
    parser.add_argument("--tp-size", type=int, help="tensor parallel degree (NxD -> HF: detected)")
    parser.add_argument("--pp-size", type=int, help="pipeline parallel degree (HF -> NxD default 1; NxD -> HF: detected)")
    parser.add_argument("--kv-size-multiplier", type=int, help="kv head replication, NxDT's kv_replicator (default 1; NxD -> HF: detected)")
    parser.add_argument("--qkv-linear", action=argparse.BooleanOptionalAction, default=None,
                        help="GQAQKVColumnParallelLinear layout, qkv_proj.weight_q/k/v (HF -> NxD default: on)")
    parser.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=None,
                        help="store q, k, v fused per rank (HF -> NxD default: off)")
    parser.add_argument("--save-xser", action=argparse.BooleanOptionalAction, default=None,
                        help="write NxD files in xser layout, <file>.tensors/tensor_N.pt (default: on, as NxDT's load_xser: True); "
                             "reading detects the layout")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="NxD -> HF: cast weights (default: keep)")
    parser.add_argument("--max-shard-size", default="2GB", help="NxD -> HF: largest safetensors shard (default 2GB)")
    parser.add_argument("--tokenizer", help="NxD -> HF: directory whose tokenizer files to copy (default: next to the input)")
    parser.add_argument("--overwrite", action="store_true", help="replace an output directory not written by this command")


def _from_recipe(args: argparse.Namespace) -> dict | None:
    """Settings for HF -> NxD from a recipe; explicit flags win. None when the recipe converts nothing."""
    from recipe_runner.recipe import load_recipe  # here: the flag form runs without the recipe stack

    recipe = load_recipe(args.recipe, list(args.overrides))
    section = recipe.runner.convert_checkpoint
    if section is None and not (args.input and args.output):
        print(f"{args.recipe}: runner.convert_checkpoint is not set; nothing to convert")
        return None
    ds, model, exp = recipe.distributed_strategy, recipe.model, recipe.exp_manager

    def pick(flag, value):
        return value if flag is None else flag

    return dict(
        input=args.input or (section and section.input), output=args.output or (section and section.output),
        hf_config=args.config or model.model_config_path,
        tp_size=pick(args.tp_size, ds.tensor_model_parallel_size), pp_size=pick(args.pp_size, ds.pipeline_model_parallel_size),
        kv_size_multiplier=pick(args.kv_size_multiplier, ds.kv_replicator),
        qkv_linear=pick(args.qkv_linear, model.qkv_linear), fuse_qkv=pick(args.fuse_qkv, model.fuse_qkv),
        save_xser=pick(args.save_xser, exp.load_xser),
    )


def run(args: argparse.Namespace) -> int:
    if args.recipe is not None and "=" in args.recipe:
        raise UserError(f"{args.recipe!r} looks like an override: put the recipe path first")
    if args.overrides and args.recipe is None:
        raise UserError("key=value overrides need a RECIPE before them")
    if args.recipe is not None:
        if args.src not in (None, "hf") or args.dst not in (None, "nxd"):
            raise UserError("the RECIPE form converts HF -> NxD; for NxD -> HF use --from nxd --to hf --input --output")
        kw = _from_recipe(args)
        if kw is None:
            return 0
        if not kw["input"] or not kw["output"]:
            raise UserError(f"{args.recipe}: runner.convert_checkpoint needs input and output")
        hf_to_nxd(**kw)
        return 0
    missing = [f"--{k}" for k, v in (("from", args.src), ("to", args.dst), ("input", args.input), ("output", args.output)) if not v]
    if missing:
        raise UserError(f"missing {', '.join(missing)}: give a RECIPE, or --from, --to, --input and --output")
    if args.src == args.dst:
        raise UserError(f"--from and --to are both {args.src}: nothing to convert")
    if args.src == "hf":
        if args.tp_size is None:
            raise UserError("--tp-size is required for --from hf --to nxd (NxDT's tensor_model_parallel_size)")
        if args.dtype is not None:
            raise UserError("--dtype applies to --to hf only: NxD files keep the input's dtype")
        hf_to_nxd(input=args.input, output=args.output, hf_config=args.config, tp_size=args.tp_size,
                  pp_size=args.pp_size or 1, kv_size_multiplier=args.kv_size_multiplier or 1,
                  qkv_linear=True if args.qkv_linear is None else args.qkv_linear,
                  fuse_qkv=bool(args.fuse_qkv), save_xser=True if args.save_xser is None else args.save_xser,
                  overwrite=args.overwrite)
    else:
        if args.save_xser is not None:
            raise UserError("--save-xser/--no-save-xser apply to --to nxd; reading NxD files detects xser by itself")
        nxd_to_hf(input=args.input, output=args.output, hf_config=args.config, tp_size=args.tp_size, pp_size=args.pp_size,
                  kv_size_multiplier=args.kv_size_multiplier, qkv_linear=args.qkv_linear, fuse_qkv=args.fuse_qkv,
                  dtype=args.dtype, max_shard_size=args.max_shard_size, tokenizer_dir=args.tokenizer, overwrite=args.overwrite)
    return 0
