#!/usr/bin/env bash
# GPU check for `recipe-runner bench` (one short run on a lent GPU machine; writes under $OUT).
# Llama-3.2-1B shape, fixed 2048-token pairs and orca-like lengths, this engine vs TRL, bf16.
# Budget: ~6-8 minutes on one H100/H200 (the 8B shape needs more memory than one GPU with fp32
# master weights + AdamW state: not part of this check).
set -euo pipefail
OUT="${OUT:-/tmp/bench-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
PY="${PY:-python}"
$PY -m recipe_runner.cli bench --shape tiny --lengths fixed --steps 6 --json "$OUT/bench-tiny-cuda.json" \
  2>&1 | tee "$OUT/bench-tiny-cuda.log"
$PY -m recipe_runner.cli bench --shape llama3.2-1b --lengths both --steps 10 --timeout 240 \
  --json "$OUT/bench-1b.json" 2>&1 | tee "$OUT/bench-1b.log"
