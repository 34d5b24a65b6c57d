"""One engine of `recipe-runner bench` in its own process: `python -m recipe_runner.bench.worker
ENGINE SPEC_JSON` prints one line `BENCH_RESULT {json}` (the parent parses the last such line)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch


def main(argv: list[str]) -> int:
    engine, spec = argv[0], json.loads(argv[1])
    from recipe_runner.bench.engines import run_ours, run_trl

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    with tempfile.TemporaryDirectory(prefix=f"recipe-runner-bench-{engine}-") as work:
        result = (run_ours if engine == "ours" else run_trl)(spec, Path(work))
    result.update(engine=engine, torch=torch.__version__, threads=torch.get_num_threads())
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
