"""`recipe-runner export RUN_DIR --to hf OUT`: a checkpoint as a Hugging Face model directory
(config.json, model.safetensors, tokenizer files) that `from_pretrained` loads and a server can
serve. NxDT leaves a bare checkpoint.pt; the run directory here already holds the config and
tokenizer (run_dir/hf/), so export needs nothing else."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from recipe_runner.errors import UserError
from recipe_runner.train import checkpoint as ckpt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (exp_manager.explicit_log_dir or nemo_experiments/<name>/...)")
    p.add_argument("--to", choices=["hf"], default="hf", help="output format (Hugging Face)")
    p.add_argument("out", help="directory to write")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory name (default: the newest)")


def export_hf(run_dir: str | Path, out: str | Path, checkpoint: str | None = None) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    run_dir, out = Path(run_dir), Path(out)
    found = ckpt.list_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no complete checkpoint under {run_dir}/checkpoints; train first "
                        f"(exp_manager.create_checkpoint_callback must be true)")
    if checkpoint:
        matches = [p for _, p in found if p.name == checkpoint]
        if not matches:
            raise UserError(f"{run_dir}: no checkpoint named {checkpoint}; have: {', '.join(p.name for _, p in found)}")
        path = matches[0]
    else:
        path = found[-1][1]
    hf = run_dir / "hf"
    if not (hf / "config.json").is_file():
        raise UserError(f"{run_dir}: {hf}/config.json is missing; was this directory written by recipe-runner train?")
    config = AutoConfig.from_pretrained(hf)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    ckpt.load_checkpoint(path, model=model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(hf).save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {path.name} -> {out} (Hugging Face format: AutoModelForCausalLM.from_pretrained('{out}'))")
    return out


def run(args: argparse.Namespace) -> int:
    export_hf(args.run_dir, args.out, args.checkpoint)
    return 0
