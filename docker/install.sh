#!/usr/bin/env bash
# Install recipe-runner into the current Python environment WITHOUT replacing the packages the
# base image was built around (torch, torch-xla, the Neuron compiler/runtime/libraries).
#
# Why: the Neuron DLC's torch, torch-xla and neuron* wheels come from the Neuron pip repository
# and are built for each other; a plain `pip install .` may "upgrade" torch from PyPI and break
# the image. So: freeze their installed versions into a constraints file and install with `-c`.
# pip then either keeps them or fails loudly (a conflict), and this script checks afterwards that
# not one of them changed.
#
# Usage: docker/install.sh [PROJECT_DIR]   (PYTHON=... picks the interpreter; default python3)
set -euo pipefail

project="${1:-.}"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# name==version of every installed distribution we must keep (pip's normalized names).
protected() {
  "$python" - <<'PY'
import importlib.metadata as md
import re

KEEP = re.compile(r"^(torch|torch[-_.]?xla|torchvision|torchaudio|triton|jax|jaxlib|libneuronxla"
                  r"|neuron.*|aws[-_.]neuron.*|torch[-_.]neuronx.*|nki.*|transformers[-_.]neuronx.*)$", re.I)
seen = {}
for dist in md.distributions():
    name = dist.metadata["Name"]
    if name and KEEP.match(name):
        seen[re.sub(r"[-_.]+", "-", name).lower()] = dist.version
for name in sorted(seen):
    print(f"{name}=={seen[name]}")
PY
}

protected > "$work/constraints.txt"
echo "install.sh: keeping $(wc -l < "$work/constraints.txt") packages of the base environment:"
sed 's/^/  /' "$work/constraints.txt"

PIP_DISABLE_PIP_VERSION_CHECK=1 "$python" -m pip install --no-cache-dir -c "$work/constraints.txt" "$project"

protected > "$work/after.txt"
if ! diff -u "$work/constraints.txt" "$work/after.txt"; then
  echo "install.sh: the install changed protected packages (diff above); refusing" >&2
  exit 1
fi
"$python" -m recipe_runner.cli --version
