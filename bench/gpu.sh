#!/usr/bin/env bash
# The GPU targets of `recipe-runner bench` (README, Throughput) in one prepared device call.
#
# Here, first (needs PyPI):   bash bench/gpu_wheels.sh        # .whl/: TRL, datasets, pydantic, OmegaConf
# Then device calls:          run(command="bash bench/gpu.sh smoke 1b", carry=[".whl"], timeout_s=600)
#                             run(command="bash bench/gpu.sh 8b", carry=[".whl"], timeout_s=480)
#
# Parts (each engine pair runs in its own processes, TRL beside ours on the same card, same call):
#   smoke  tiny shape, fixed and orca-like (packed, FlexAttention): the CUDA path works (~2 min)
#   1b     Llama-3.2-1B shape, bf16: fixed 2048 x 4 pairs, then orca-like x 8 pairs      (~4 min)
#   8b     Llama-3-8B shape, fixed 4096, 1 pair/step, activation checkpointing, bf16SR  (~4 min)
#   all    smoke 1b 8b (worst case over 10 minutes: make it two calls, as above)
# Results: $OUT/bench-<part>.json and one log, $OUT/bench.log (8 files come back at most).
# If the smoke part fails, the later parts of that call run with sdpa attention; for a later call
# pass BENCH_ARGS="--attention sdpa" yourself (see bench.log for why it failed).
# A failing part is logged and the next one still runs; the exit status counts the failures.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bench-out}"
PY="${PY:-python3}"
PARTS="${*:-all}"
[ "$PARTS" = all ] && PARTS="smoke 1b 8b"
EXTRA="${BENCH_ARGS:-}"  # e.g. "--device cpu" for a dry run of this script without a GPU
mkdir -p "$OUT"
LOG="$OUT/bench.log"

if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl failed" | tee -a "$LOG"; exit 2; }
  export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ date -u; command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__)"
} 2>&1 | tee -a "$LOG"

failed=0
FALLBACK=""  # set when the smoke part fails: the later parts then run with sdpa attention
bench() {  # bench NAME SECONDS ARGS...: one `recipe-runner bench` invocation under a wall-clock limit
  local name=$1 limit=$2; shift 2
  echo "=== $name: bench $* $EXTRA" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" $PY -m recipe_runner.cli bench --json "$OUT/bench-$name.json" "$@" $FALLBACK $EXTRA 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}

for part in $PARTS; do
  case "$part" in
    smoke) bench smoke 260 --shape tiny --lengths both --pairs 2 --steps 4 --warmup 1 --timeout 60
           if [ "$failed" != 0 ]; then  # e.g. FlexAttention on this card: measure the rest with sdpa
             FALLBACK="--attention sdpa"; echo "smoke failed: later parts use $FALLBACK" | tee -a "$LOG"; fi ;;
    1b)  # the anchors' runs 1b-s2048-b4 and 1b-varlen-b8 (TRL measured again here, same card)
         bench 1b-fixed 240 --shape llama3.2-1b --lengths fixed --seq 2048 --pairs 4 --steps 10 --timeout 110
         bench 1b-orca 300 --shape llama3.2-1b --lengths orca --seq 4096 --pairs 8 --steps 10 --timeout 140 ;;
    8b)  # the anchor's 8b-s4096-b1-gc: bf16 weights and AdamW state in both engines (ours: bf16SR)
         bench 8b-fixed 360 --shape llama3-8b --lengths fixed --seq 4096 --pairs 1 --grad-ckpt --steps 6 --timeout 170 ;;
    *) echo "usage: bash bench/gpu.sh [smoke] [1b] [8b] | all" >&2; exit 2 ;;
  esac
done
echo "failed parts: $failed" | tee -a "$LOG"
exit "$failed"
