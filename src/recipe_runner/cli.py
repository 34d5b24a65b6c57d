"""The `recipe-runner` command: one sub-command per verb, each a thin call into its module.

Every verb module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported
only when their verb runs, so `recipe-runner validate` does not pay for torch or boto3.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from recipe_runner import __version__
from recipe_runner.errors import UserError

# verb -> (module, one-line help). The order is the order of a run.
VERBS: dict[str, tuple[str, str]] = {
    "validate": ("recipe_runner.recipe.commands", "check a recipe (and key=value overrides) and print it resolved"),
    "fetch": ("recipe_runner.prepare.fetch", "download the recipe's dataset and model (s3, https, hf, local)"),
    "prepare-data": ("recipe_runner.prepare.formats", "convert raw datasets to prompt/chosen/rejected jsonl"),
    "convert-checkpoint": ("recipe_runner.prepare.convert", "convert checkpoints between Hugging Face and NxD layouts"),
    "compile": ("recipe_runner.backends.compile", "compile the training graphs ahead of time (Neuron)"),
    "train": ("recipe_runner.train.commands", "train a recipe (DPO or ORPO)"),
    "export": ("recipe_runner.train.export", "write a checkpoint as a Hugging Face model directory"),
    "report": ("recipe_runner.deploy.report", "plot a run's metrics and write a summary"),
    "render": ("recipe_runner.deploy.render", "render a recipe into Helm values and k8s manifests"),
    "watch": ("recipe_runner.deploy.watch", "follow a Helm release's job on Kubernetes"),
    "bench": ("recipe_runner.bench", "measure throughput against TRL"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipe-runner", description="DPO/ORPO preference fine-tuning recipes: validate, prepare, train, export, deploy.")
    parser.add_argument("--version", action="version", version=f"recipe-runner {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in VERBS:
        parser.parse_args(argv or ["--help"])  # prints help or a usage error and exits
        return 2
    verb = argv[0]
    module_name, help_text = VERBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("recipe_runner"):
            print(f"recipe-runner {verb}: not available in this build ({e.name} is missing)", file=sys.stderr)
            return 2
        raise
    verb_parser = argparse.ArgumentParser(prog=f"recipe-runner {verb}", description=help_text)
    module.add_arguments(verb_parser)
    args = verb_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
