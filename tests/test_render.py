"""`recipe-runner render`: recipe -> chart copy + Helm values + plain manifests, and the check that
the committed rendered files are not stale."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from helm_support import CHART, ROOT, helm_binary, k8s_versions, validate
from recipe_runner.cli import main
from recipe_runner.deploy.render import parse_image


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A copy of the chart and recipes in a temp dir, as the cwd (render works from the repo root)."""
    shutil.copytree(CHART, tmp_path / "helm")
    shutil.copytree(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECIPE_RUNNER_HELM", helm_binary())
    return tmp_path


def committed_render_args(values_file: Path) -> list[str]:
    """The render command line that produced a committed k8s/<recipe>/values.yaml."""
    values = yaml.safe_load(values_file.read_text())
    args = [f"recipes/{values['recipe']}.yaml", "--profile", values["profile"]]
    if "instanceType" in values:
        args += ["--instance-type", values["instanceType"]]
    if "numNodes" in values:
        args += ["--num-nodes", str(values["numNodes"])]
    image = values.get("image")
    if image:
        ref = image["repository"] + (f"@{image['digest']}" if image.get("digest") else f":{image['tag']}" if image.get("tag") else "")
        args += ["--image", ref]
    else:
        args += ["--image", "default"]
    return args


def test_committed_rendered_files_are_fresh(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RECIPE_RUNNER_HELM", helm_binary())
    values_files = sorted((ROOT / "k8s").glob("*/values.yaml"))
    assert {p.parent.name for p in values_files} == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    for values_file in values_files:
        rc = main(["render", *committed_render_args(values_file), "--check"])
        err = capsys.readouterr().err
        assert rc == 0, f"{values_file.parent}: stale rendered files; run `make render`:\n{err}"


def test_prerequisites_are_valid_kubernetes():
    import kubernetes_validate

    files = sorted((ROOT / "k8s/prerequisites").glob("*.yaml"))
    kinds = set()
    for f in files:
        for obj in kubernetes_validate.utils.resources_from_file(str(f)):
            kinds.add(obj["kind"])
            for version in k8s_versions():
                validate(obj, version)
    assert kinds == {"Namespace", "StorageClass", "PersistentVolumeClaim", "Job"}


def test_render_cpu_recipe(workdir, capsys):
    assert main(["render", "recipes/tiny-dpo.yaml", "--profile", "cpu", "--image", "reg.example/rr:abc123"]) == 0
    chart_copy = yaml.safe_load((workdir / "helm/recipes/tiny-dpo.yaml").read_text())
    assert chart_copy["recipe"] == (workdir / "recipes/tiny-dpo.yaml").read_text()  # verbatim
    assert chart_copy["devices"] == 1 and chart_copy["numNodes"] == 1 and chart_copy["source"] == "recipes/tiny-dpo.yaml"
    values = yaml.safe_load((workdir / "k8s/tiny-dpo/values.yaml").read_text())
    assert values == {"recipe": "tiny-dpo", "profile": "cpu", "image": {"repository": "reg.example/rr", "tag": "abc123"},
                      "storage": {"create": True, "existingClaim": "", "accessMode": "ReadWriteOnce", "size": "20Gi"}}
    objs = [d for d in yaml.safe_load_all((workdir / "k8s/tiny-dpo/manifests.yaml").read_text()) if d]
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "Job", "PersistentVolumeClaim", "Service"]  # no helm test
    job = [o for o in objs if o["kind"] == "Job"][0]
    assert job["metadata"]["namespace"] == "recipe-runner"
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/rr:abc123"
    for obj in objs:
        for version in k8s_versions():
            validate(obj, version)
    # a second render changes nothing
    assert main(["render", "recipes/tiny-dpo.yaml", "--profile", "cpu", "--image", "reg.example/rr:abc123"]) == 0
    assert capsys.readouterr().out.count("unchanged") >= 3


def test_render_takes_the_last_built_image_and_node_count(workdir):
    (workdir / ".cache").mkdir()
    (workdir / ".cache/last-image").write_text("111122223333.dkr.ecr.us-east-1.amazonaws.com/recipe-runner:0a1b2c3\n")
    assert main(["render", "recipes/llama3.1-8b-orpo.yaml", "--num-nodes", "2", "--instance-type", "trn1n.32xlarge"]) == 0
    values = yaml.safe_load((workdir / "k8s/llama3.1-8b-orpo/values.yaml").read_text())
    assert values == {"recipe": "llama3.1-8b-orpo", "profile": "neuron", "instanceType": "trn1n.32xlarge", "numNodes": 2,
                      "image": {"repository": "111122223333.dkr.ecr.us-east-1.amazonaws.com/recipe-runner", "tag": "0a1b2c3"}}
    objs = [d for d in yaml.safe_load_all((workdir / "k8s/llama3.1-8b-orpo/manifests.yaml").read_text()) if d]
    job = [o for o in objs if o["kind"] == "Job"][0]
    assert job["spec"]["completions"] == 2
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"aws.amazon.com/neuron": 16, "vpc.amazonaws.com/efa": 16}


def test_check_reports_a_stale_chart_copy_and_writes_nothing(workdir, capsys):
    assert main(["render", "recipes/tiny-orpo.yaml", "--profile", "cpu", "--image", "default"]) == 0
    recipe = workdir / "recipes/tiny-orpo.yaml"
    recipe.write_text(recipe.read_text().replace("max_steps: 64", "max_steps: 65"))
    before = (workdir / "helm/recipes/tiny-orpo.yaml").read_text()
    assert main(["render", "recipes/tiny-orpo.yaml", "--profile", "cpu", "--image", "default", "--check"]) == 1
    err = capsys.readouterr().err
    assert "stale: helm/recipes/tiny-orpo.yaml, k8s/tiny-orpo/manifests.yaml" in err and "+    max_steps: 65" in err
    assert (workdir / "helm/recipes/tiny-orpo.yaml").read_text() == before


def test_without_helm_render_still_updates_chart_and_values(workdir, monkeypatch, capsys):
    monkeypatch.delenv("RECIPE_RUNNER_HELM")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["render", "recipes/tiny-dpo.yaml", "--profile", "cpu"]) == 0
    assert (workdir / "helm/recipes/tiny-dpo.yaml").is_file() and (workdir / "k8s/tiny-dpo/values.yaml").is_file()
    assert not (workdir / "k8s/tiny-dpo/manifests.yaml").exists()
    assert "helm not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["recipes/llama3-8b-dpo.yaml", "--instance-type", "p5.48xlarge"], "--instance-type p5.48xlarge: unknown; known: trn1.2xlarge"),
    (["recipes/llama3-8b-dpo.yaml", "--instance-type", "trn1.2xlarge"], "trainer.devices=32 but a trn1.2xlarge has 2 NeuronCores"),
    (["recipes/missing.yaml"], "recipes/missing.yaml: no such file"),
    ([], "name recipe files"),
])
def test_render_errors_are_actionable(workdir, capsys, argv, message):
    assert main(["render", *argv]) == 2
    assert message in capsys.readouterr().err


def test_render_needs_the_chart(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["render", str(ROOT / "recipes/tiny-dpo.yaml")]) == 2
    assert "helm/Chart.yaml not found: run from the repository root or pass --chart DIR" in capsys.readouterr().err


@pytest.mark.parametrize("ref, expected", [
    ("recipe-runner:dev", {"repository": "recipe-runner", "tag": "dev"}),
    ("localhost:5000/rr:1", {"repository": "localhost:5000/rr", "tag": "1"}),
    ("localhost:5000/rr", {"repository": "localhost:5000/rr"}),
    ("reg/rr@sha256:" + "a" * 64, {"repository": "reg/rr", "digest": "sha256:" + "a" * 64}),
    (None, None),
])
def test_parse_image(ref, expected):
    assert parse_image(ref) == expected
