"""`recipe-runner validate RECIPE [key=value ...]`: load, check, list unused keys, print resolved."""

from __future__ import annotations

import argparse

import yaml

from recipe_runner.backends import DEVICES, resolve_device
from recipe_runner.recipe.checks import not_used_on
from recipe_runner.recipe.load import load_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (NxDT keys + runner: section)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.max_steps=10")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="check for this device instead of the recipe's runner.device")
    p.add_argument("--print", dest="show", action="store_true", help="print the resolved recipe as YAML")


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device) if args.device else None
    recipe = load_recipe(args.recipe, args.overrides, device=device)
    device = device or resolve_device(recipe.runner.device)
    unused = not_used_on(recipe, device)
    if unused:
        print(f"not used on {device}: {', '.join(unused)}")
    al = recipe.alignment
    print(f"ok: {args.recipe}: {recipe.algorithm.upper()}, seq_length {recipe.data.seq_length}, "
          f"max_prompt_length {al.max_prompt_length}, global batch {recipe.data.global_batch_size} pairs, "
          f"{recipe.trainer.devices} devices x {recipe.trainer.num_nodes} nodes, device {device}")
    if args.show:
        print(yaml.safe_dump(recipe.resolved, sort_keys=False))
    return 0
