"""`recipe-runner render`: put a recipe into the Helm chart and render plain Kubernetes manifests.

Helm cannot read files outside the chart directory, so the recipe travels into the chart as
helm/recipes/<name>.yaml: its verbatim text (the ConfigMap the pods read) plus the few resolved
values the templates need (devices, nodes, compile cache, Neuron runtime settings). Plain
manifests under k8s/<name>/ are made by `helm template` from generated values, so the chart stays
the only template of a pod; without helm, render still updates the chart and the values.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml

from recipe_runner.errors import UserError

LAST_IMAGE = Path(".cache/last-image")  # written by `make build`
NAMESPACE = "recipe-runner"  # the namespace k8s/prerequisites creates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="*", metavar="RECIPE", help="recipe files (e.g. recipes/llama3-8b-dpo.yaml)")
    parser.add_argument("--all", action="store_true", help="every recipes/*.yaml")
    parser.add_argument("--profile", choices=["neuron", "cpu"], default="neuron",
                        help="neuron: Trainium nodes (default); cpu: any cluster, e.g. kind or minikube")
    parser.add_argument("--instance-type", default="trn1.32xlarge", help="neuron profile: node type (default trn1.32xlarge)")
    parser.add_argument("--num-nodes", type=int, default=None, help="pods (nodes); default the recipe's trainer.num_nodes")
    parser.add_argument("--image", default=None,
                        help=f"REPO:TAG or REPO@sha256:...; default the last `make build` ({LAST_IMAGE}), else "
                             "the chart's default (also with --image default)")
    parser.add_argument("--out", default="k8s", help="writes OUT/<recipe>/values.yaml and OUT/<recipe>/manifests.yaml (default k8s)")
    parser.add_argument("--chart", default="helm", help="the chart directory (default helm)")
    parser.add_argument("--namespace", default=NAMESPACE, help=f"namespace of the plain manifests (default {NAMESPACE})")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a rendered file is stale")


def run(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.recipes]
    if args.all:
        paths += sorted(Path("recipes").glob("*.yaml"))
    if not paths:
        raise UserError("render: name recipe files (recipes/<name>.yaml) or pass --all")
    chart = Path(args.chart)
    if not (chart / "Chart.yaml").is_file():
        raise UserError(f"render: {chart}/Chart.yaml not found: run from the repository root or pass --chart DIR")
    helm = find_helm()
    stale: list[str] = []

    def emit(target: Path, text: str) -> None:
        if target.is_file() and target.read_text() == text:
            print(f"unchanged {target}")
        elif args.check:
            stale.append(str(target))
            _print_diff(target, text)
        else:
            write_atomic(target, text)
            print(f"wrote {target}")

    for path in paths:
        rendered = render_recipe(path, chart, args)
        # helm reads the recipe from the chart, so the chart's copy goes first
        emit(rendered.chart_file, rendered.chart_text)
        emit(rendered.values_file, rendered.values_text)
        if helm is None:
            if args.check:
                raise UserError("render --check needs helm to compare the manifests: run `make tools`")
            print(f"note: helm not found (PATH, .tools/bin): {rendered.manifests_file} not rendered. "
                  "`make tools` installs it.", file=sys.stderr)
            continue
        emit(rendered.manifests_file, helm_template(helm, chart, path.stem, rendered.values_text, args.namespace,
                                                    chart_override=rendered.chart_text if args.check else None))
    if stale:
        print(f"stale: {', '.join(stale)}. Run `make render` and commit the result.", file=sys.stderr)
        return 1
    return 0


@dataclass
class Rendered:
    chart_file: Path
    chart_text: str
    values_file: Path
    values_text: str
    manifests_file: Path


def render_recipe(path: Path, chart: Path, args: argparse.Namespace) -> Rendered:
    """What one recipe renders to: the chart's copy of the recipe and the Helm values."""
    from recipe_runner.recipe import load_recipe

    if not path.is_file():
        raise UserError(f"render: recipe {path}: no such file")
    stem = path.stem
    text = path.read_text()
    recipe = load_recipe(path, device="cpu" if args.profile == "cpu" else "xla")
    facts = recipe_facts(recipe, path)
    num_nodes = args.num_nodes or recipe.trainer.num_nodes
    if args.profile == "neuron":
        check_instance(chart, args.instance_type, recipe.trainer.devices, path)
    image = None if args.image == "default" else parse_image(args.image or read_last_image())
    env = jinja2.Environment(loader=jinja2.PackageLoader("recipe_runner.deploy", "templates"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["yaml"] = _yaml_inline
    out = Path(args.out) / stem
    return Rendered(
        chart_file=chart / "recipes" / f"{stem}.yaml",
        chart_text=env.get_template("chart-recipe.yaml.j2").render(facts=facts, recipe_text=text),
        values_file=out / "values.yaml",
        values_text=env.get_template("values.yaml.j2").render(
            stem=stem, source=facts["source"], profile=args.profile, instance_type=args.instance_type,
            nodes=num_nodes, num_nodes=num_nodes if num_nodes != recipe.trainer.num_nodes else None, image=image),
        manifests_file=out / "manifests.yaml",
    )


def _yaml_inline(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def recipe_facts(recipe, path: Path) -> dict:
    """The resolved recipe values the chart's templates read (they cannot run load_recipe)."""
    try:
        source = str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        source = path.name
    return {
        "source": source,
        "name": recipe.name,
        "devices": recipe.trainer.devices,
        "numNodes": recipe.trainer.num_nodes,
        "device": recipe.runner.device,
        "explicitLogDir": recipe.exp_manager.explicit_log_dir,
        "compilerCacheUrl": recipe.compiler_cache_url or "",
        "compilerFlags": recipe.compiler_flags or "",
        "asyncExecMaxInflightRequests": recipe.aync_exec_max_inflight_requests,
        "neuronRtExecTimeout": recipe.neuron_rt_exec_timeout,
        "sources": {name: src.uri for name, src in recipe.runner.sources.items()},
    }


def check_instance(chart: Path, instance_type: str, devices: int, path: Path) -> None:
    """Fail early (before helm) on an instance type the chart does not know or too many devices."""
    types = yaml.safe_load((chart / "instance-types.yaml").read_text()) or {}
    if instance_type not in types:
        raise UserError(f"render: --instance-type {instance_type}: unknown; known: {', '.join(sorted(types))} "
                        f"({chart}/instance-types.yaml)")
    cores = int(types[instance_type]["neuronCores"])
    if devices > cores:
        raise UserError(f"{path}: trainer.devices={devices} but a {instance_type} has {cores} NeuronCores: "
                        "lower trainer.devices or pick a larger --instance-type")


def read_last_image() -> str | None:
    if LAST_IMAGE.is_file():
        return LAST_IMAGE.read_text().strip() or None
    return None


def parse_image(ref: str | None) -> dict | None:
    """REPO:TAG or REPO@sha256:DIGEST -> chart image values (None: the chart's default)."""
    if not ref:
        return None
    if "@" in ref:
        repo, digest = ref.split("@", 1)
        return {"repository": repo, "digest": digest}
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:  # no tag, or the colon was a registry port
        return {"repository": ref}
    return {"repository": repo, "tag": tag}


def find_helm() -> str | None:
    for candidate in (os.environ.get("RECIPE_RUNNER_HELM"), shutil.which("helm"), ".tools/bin/helm"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def helm_template(helm: str, chart: Path, release: str, values: str, namespace: str,
                  chart_override: str | None = None) -> str:
    """`helm template` the chart with generated values; returns the manifests (test hooks left out).
    chart_override: text for the chart's copy of the recipe instead of the file on disk (--check)."""
    with tempfile.TemporaryDirectory() as tmp:
        chart_dir = chart
        if chart_override is not None:  # template a copy, so --check writes nothing
            chart_dir = Path(tmp) / "chart"
            shutil.copytree(chart, chart_dir)
            (chart_dir / "recipes" / f"{release}.yaml").write_text(chart_override)
        values_file = Path(tmp) / "values.yaml"
        values_file.write_text(values)
        cmd = [helm, "template", release, str(chart_dir), "--namespace", namespace, "--skip-tests", "-f", str(values_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"render: helm template {release} failed:\n{proc.stderr.strip()}")
    header = (f"# Generated by `recipe-runner render` (helm template of {chart}/ with values.yaml beside this file).\n"
              f"# Apply once the prerequisites exist: kubectl apply -f k8s/{release}/manifests.yaml\n")
    return header + proc.stdout


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _print_diff(target: Path, text: str) -> None:
    old = target.read_text().splitlines(keepends=True) if target.is_file() else []
    sys.stderr.writelines(list(difflib.unified_diff(old, text.splitlines(keepends=True), str(target), "rendered"))[:40])
