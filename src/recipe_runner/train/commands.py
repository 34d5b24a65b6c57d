"""`recipe-runner train RECIPE [key=value ...]`."""

from __future__ import annotations

import argparse

from recipe_runner.backends import DEVICES, resolve_device
from recipe_runner.errors import UserError
from recipe_runner.recipe import load_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. trainer.max_steps=10")
    p.add_argument("--device", choices=DEVICES, default=None, help="overrides runner.device")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"runner.device={args.device}"] if args.device else [])
    recipe = load_recipe(args.recipe, overrides)
    device = resolve_device(recipe.runner.device)
    if device == "xla":
        try:
            from recipe_runner.backends.xla import train_xla
        except ImportError as e:
            raise UserError(f"device xla needs torch-xla ({e}); use the Neuron image or runner.device=cpu") from None
        run_dir = train_xla(recipe)
    else:
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UserError("runner.device is cuda but no CUDA GPU is visible; use runner.device=auto or cpu")
        from recipe_runner.train.loop import Trainer

        run_dir = Trainer(recipe, device).run()
    print(f"done: metrics {run_dir}/metrics.jsonl, TensorBoard {run_dir}/tensorboard, "
          f"checkpoints {run_dir}/checkpoints", flush=True)
    return 0
