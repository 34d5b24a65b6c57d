"""`recipe-runner bench`: this engine and TRL's DPOTrainer side by side, same model shape, same
synthetic data, same machine, one invocation. Prints a table (tokens/s all and real, pairs/s,
peak memory, ratio to TRL) and writes JSON.

Why in this project: the claim "faster than TRL" should be a command anyone can rerun, not a
sentence. Each engine runs in a separate worker process (bench/worker.py). Speed is measured and
reported, never asserted: on a shared machine the numbers move.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from recipe_runner.bench.engines import LAYOUTS
from recipe_runner.bench.synthetic import SHAPES, bf16_matmul_peak_tflops, default_seq, model_flops_per_token
from recipe_runner.errors import UserError

NO_GPU_NOTE = ("no GPU in this session: CPU numbers only. The CUDA path (bf16SR weights, FlexAttention for packed "
               "rows, fused AdamW, torch.cuda.max_memory_allocated, model TFLOP/s against a measured bf16 matmul "
               "peak) is written but was not run here: bench/gpu.sh runs it on a lent GPU.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="random-init Llama shape (default tiny)")
    p.add_argument("--lengths", choices=("fixed", "orca", "both"), default="both",
                   help="fixed: every pair seq/2 prompt + seq/2 answers; orca: lognormal uneven lengths (default both)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: 128 fixed / 1024 orca on tiny)")
    p.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step (default 4)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per engine (default 8 on CPU, 12 on GPU)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (default 2)")
    p.add_argument("--layout", choices=("auto",) + tuple(sorted(LAYOUTS)), default="auto",
                   help="this engine's batch layout. auto: packed+shared for orca lengths on CUDA (FlexAttention "
                        "skips the masked tiles), else shared (one pair per row, prompt once; fastest on CPU, where "
                        "packing's dense masks cost more attention than the padding they remove)")
    p.add_argument("--precision", choices=("auto", "bf16SR", "mixed_precision", "fp32"), default="auto",
                   help="this engine's precision.type. auto: bf16SR on CUDA (bf16 weights and AdamW state, as TRL's "
                        "bf16 runs and its anchors), fp32 on CPU")
    p.add_argument("--attention", choices=("auto", "sdpa", "eager", "flex_attention"), default="auto",
                   help="this engine's runner.attention (default auto)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in both engines")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per engine (default: torch's default; 1 is steadier on a busy machine)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the engines this many times, alternating, and keep each one's median run (default 1)")
    p.add_argument("--no-trl", action="store_true", help="measure only this engine")
    p.add_argument("--json", metavar="OUT", default=None, help="write the results here as JSON")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per engine run (default 3600)")


def bench_layout(requested: str, device: str, lengths: str) -> str:
    """Uneven lengths on CUDA pack (FlexAttention skips masked tiles); fixed pairs gain nothing
    from packing (one pair fills a row), and on CPU the dense masks cost more than they save."""
    if requested != "auto":
        return requested
    return "packed+shared" if device == "cuda" and lengths == "orca" else "shared"


def _run_worker(engine: str, spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "recipe_runner.bench.worker", engine, json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("threads"):
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise UserError(f"bench: the {engine} run took longer than --timeout {timeout}s; "
                        f"lower --steps/--seq or raise --timeout") from None
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if res.returncode != 0 or not lines:
        tail = (res.stdout[-2000:] + "\n" + res.stderr[-4000:]).strip()
        raise UserError(f"bench: the {engine} run failed (exit {res.returncode}):\n{tail}")
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def _add_flops(result: dict, spec: dict, peak: float | None) -> None:
    """Model TFLOP/s of the logical work (same yardstick for both engines) and its share of peak."""
    if spec["device"] != "cuda":
        return
    mean_len = result["real_tokens_per_step"] / (2 * spec["pairs"])
    tflops = model_flops_per_token(SHAPES[spec["shape"]], mean_len) * result["tokens_per_s_real"] / 1e12
    result["model_tflops"] = round(tflops, 1)
    if peak:
        result["fraction_of_bf16_peak"] = round(tflops / peak, 3)


def _fmt(x, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def table(report: dict) -> str:
    mem_key = "peak_mem_gib" if report["device"] == "cuda" else "peak_rss_mib"
    mem_name = "peak GiB" if report["device"] == "cuda" else "peak RSS MiB"
    head = ["lengths", "seq", "engine", "pairs/s", "tokens/s all", "tokens/s real", mem_name, "setup s", "x TRL pairs/s"]
    if report["device"] == "cuda":
        head.insert(7, "TFLOP/s")
    rows = [head]
    for run in report["runs"]:
        for engine in ("ours", "trl"):
            r = run.get(engine)
            if r is None:
                continue
            ratio = run.get("ratio", {}).get("pairs_per_s") if engine == "ours" else None
            row = [run["lengths"], str(run["seq"]), engine, _fmt(r["pairs_per_s"], ",.2f"), _fmt(r["tokens_per_s_all"]),
                   _fmt(r["tokens_per_s_real"]), _fmt(r.get(mem_key), ",.1f"), _fmt(r["setup_incl_precompute_s"], ".1f"),
                   "-" if ratio is None else f"{ratio:.2f}x"]
            if report["device"] == "cuda":
                row.insert(7, _fmt(r.get("model_tflops"), ".1f"))
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("bench --device cuda: no CUDA GPU is visible; use --device cpu")
    if args.pairs < 1 or (args.steps is not None and args.steps <= args.warmup):
        raise UserError("bench: --pairs must be >= 1 and --steps larger than --warmup")
    steps = args.steps or (12 if device == "cuda" else 8)
    peak = bf16_matmul_peak_tflops() if device == "cuda" else None
    report = {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "shape": args.shape, "pairs": args.pairs, "steps": steps, "warmup": args.warmup,
              "bf16_matmul_peak_tflops": None if peak is None else round(peak, 1), "cpu_count": os.cpu_count(),
              "note": None if device == "cuda" else NO_GPU_NOTE, "runs": []}
    lengths = ("fixed", "orca") if args.lengths == "both" else (args.lengths,)
    for kind in lengths:
        spec = {"shape": args.shape, "lengths": kind, "seq": args.seq or default_seq(args.shape, kind),
                "pairs": args.pairs, "steps": steps, "warmup": args.warmup, "seed": args.seed, "device": device,
                "layout": bench_layout(args.layout, device, kind), "grad_ckpt": args.grad_ckpt,
                "threads": args.threads, "attention": args.attention,
                "precision": args.precision if args.precision != "auto" else ("bf16SR" if device == "cuda" else "fp32")}
        run_ = {"lengths": kind, "seq": spec["seq"], "spec": spec}
        engines = ("ours",) if args.no_trl else ("ours", "trl")
        tries: dict[str, list[dict]] = {e: [] for e in engines}
        for attempt in range(max(1, args.repeats)):
            for engine in engines:  # alternate, so a busy spell on a shared machine hits both
                print(f"bench: {engine}, {args.shape}, {kind} lengths, seq {spec['seq']}, {args.pairs} pairs/step, "
                      f"{steps} steps (run {attempt + 1}/{max(1, args.repeats)}) ...", flush=True)
                tries[engine].append(_run_worker(engine, spec, args.timeout))
        for engine, results in tries.items():
            results.sort(key=lambda r: r["pairs_per_s"])
            run_[engine] = dict(results[len(results) // 2], repeats_pairs_per_s=[r["pairs_per_s"] for r in results])
            _add_flops(run_[engine], spec, peak)
        if "trl" in run_:
            o, t = run_["ours"], run_["trl"]
            run_["ratio"] = {k: round(o[k] / t[k], 3) for k in ("pairs_per_s", "tokens_per_s_real") if t[k]}
        report["runs"].append(run_)
    print()
    print(table(report))
    for run_ in report["runs"]:
        print(f"\nours ({run_['lengths']}): {run_['ours']['settings']}")
    if not args.no_trl:
        print(f"trl:  {report['runs'][0]['trl']['settings']}")
    if peak:
        print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")
    if report["note"]:
        print(report["note"])
    if args.json:
        tmp = f"{args.json}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    return 0
