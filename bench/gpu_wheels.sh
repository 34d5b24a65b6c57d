#!/usr/bin/env bash
# Run HERE (with PyPI), before a device call: downloads into .whl/ the Python 3.12 wheels that the
# lent GPU machine's image lacks (it has torch, transformers, accelerate, pyarrow, ...; not TRL,
# datasets, pydantic or OmegaConf, and it cannot reach PyPI). The device call carries .whl and
# bench/gpu.sh installs them with --no-deps. Versions: the ones this project's CI tests with.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
PIN="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pydantic==2.14.4 pydantic-core==2.50.5
     annotated-types==0.8.0 typing-inspection==0.4.5 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $PIN
ls -la .whl && du -sh .whl
