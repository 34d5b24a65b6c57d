"""Shared helpers for the chart tests: get helm (the same installer as `make tools`), render the
chart with `helm template`, validate objects with kubernetes-validate."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm"
RECIPES = sorted(p.stem for p in (CHART / "recipes").glob("*.yaml"))
INSTANCE_TYPES = yaml.safe_load((CHART / "instance-types.yaml").read_text())
K8S_OLDEST = "1.29"


@functools.lru_cache(maxsize=1)
def helm_binary() -> str:
    """helm from PATH or .tools/bin, else downloaded by scripts/install_tools.py; skip (with the
    reason) only when that is impossible, e.g. offline."""
    spec = importlib.util.spec_from_file_location("install_tools", ROOT / "scripts" / "install_tools.py")
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)
    try:
        return str(tools.ensure() / "helm")
    except RuntimeError as e:
        pytest.skip(f"helm is not available and could not be installed: {e}")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def set_args(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["--set-json", f"{key}={json.dumps(value)}"]
    return out


def template(release: str = "dpo-llama3", chart: Path = CHART, skip_tests: bool = False, **values) -> list[dict]:
    """`helm template` -> the list of objects. values: dotted keys -> JSON-able values."""
    args = ["template", release, str(chart), "--namespace", "ml", *set_args(values)]
    if skip_tests:
        args.append("--skip-tests")
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def template_error(**values) -> str:
    proc = helm("template", "r", str(CHART), *set_args(values), check=False)
    assert proc.returncode != 0, f"expected helm template to fail for {values}"
    return proc.stderr


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def training_pod_spec(objs: list[dict]) -> dict:
    jobs = by_kind(objs, "Job")
    if jobs:
        return jobs[0]["spec"]["template"]["spec"]
    return one(objs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def trainer(spec: dict) -> dict:
    [c] = [c for c in spec["containers"] if c["name"] == "trainer"]
    return c


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def k8s_versions() -> list[str]:
    """The oldest Kubernetes the chart supports and the newest kubernetes-validate knows."""
    import kubernetes_validate.utils as kv

    return [K8S_OLDEST, kv.major_minor(kv.latest_version())]


def validate(obj: dict, version: str) -> None:
    """Strict schema validation of one object with kubernetes-validate's Python API."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: "
                             f"{'.'.join(map(str, e.caught.path))}: {e.caught.message}") from None
