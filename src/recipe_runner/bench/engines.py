"""The two engines under the same clock: this project's Trainer and TRL's DPOTrainer.

Each runs in its own worker process (bench/worker.py) so that one engine's imports, threads and
memory peak do not colour the other's. Both: the same random-init model shape and seed, the same
text rows and tokenizer, precomputed reference log-probs (outside the timed steps), one optimizer
step per `pairs` pairs. A step's time is the median over the steps after `warmup`.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch
import yaml

from recipe_runner.bench.synthetic import config_dict, make_rows, make_tokenizer

# Batch layouts of our engine (runner.data.packing, prefix_sharing). All give the same numbers;
# the bench default (prefix sharing, log-probs of response tokens only via the dynamic gather in
# model/logprobs.py, reference precomputed) measured fastest on CPU: packed rows are up to
# 2 x seq_length wide and their block masks are dense, so attention work grows with the row.
LAYOUTS = {"packed+shared": (True, True), "packed": (True, False), "shared": (False, True), "rows": (False, False)}


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _memory(cuda: bool) -> dict:
    if cuda:
        return {"peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _summary(step_times: list[float], warmup: int, pairs: int, tokens_all: list[int], tokens_real: list[int]) -> dict:
    timed = step_times[warmup:] or step_times
    all_t = tokens_all[warmup:] or tokens_all
    real_t = tokens_real[warmup:] or tokens_real
    step_s = statistics.median(timed)
    mean_s = sum(timed) / len(timed)
    return {"steps_timed": len(timed), "median_step_s": round(step_s, 5),
            "pairs_per_s": round(pairs / step_s, 3),
            "tokens_per_s_all": round(sum(all_t) / len(all_t) / step_s, 1),
            "tokens_per_s_real": round(sum(real_t) / len(real_t) / step_s, 1),
            "real_tokens_per_step": round(sum(real_t) / len(real_t), 1), "mean_step_s": round(mean_s, 5)}


def run_ours(spec: dict, work: Path) -> dict:
    """Train spec["steps"] steps of this project's Trainer on the synthetic set and time them."""
    from recipe_runner.recipe import load_recipe
    from recipe_runner.train.loop import Trainer

    shape, seq, pairs, cuda = spec["shape"], spec["seq"], spec["pairs"], spec["device"] == "cuda"
    packing, sharing = LAYOUTS[spec["layout"]]
    cfg = config_dict(shape, seq)
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(cfg["vocab_size"]).save_pretrained(str(model_dir))
    (model_dir / "config.json").write_text(json.dumps(cfg))
    rows = make_rows(pairs * (spec["steps"] + 2), cfg["vocab_size"], seq, spec["lengths"], seed=spec["seed"] + 1)
    with open(work / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    recipe = {
        "name": "bench", "model_source": "hf", "seed": spec["seed"],
        "trainer": {"devices": 1, "num_nodes": 1, "max_epochs": -1, "max_steps": spec["steps"],
                    "log_every_n_steps": 1, "val_check_interval": 10**6, "limit_val_batches": 0,
                    "gradient_clip_val": 1.0},
        "exp_manager": {"create_tensorboard_logger": False, "explicit_log_dir": str(work / "run"),
                        "resume_if_exists": False, "create_checkpoint_callback": False,
                        "resume_from_checkpoint": None},
        "distributed_strategy": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1},
        "data": {"micro_batch_size": pairs, "global_batch_size": pairs, "train_dir": str(work / "train.jsonl"),
                 "val_dir": None, "seq_length": seq, "tokenizer": {"type": str(model_dir)}},
        "model": {"model_config": str(model_dir / "config.json"), "weight_init_only": True,
                  "activations_checkpoint_granularity": "full" if spec.get("grad_ckpt") else None,
                  "optim": {"name": "adamw_fp32OptState", "lr": 1e-6, "weight_decay": 0.0,
                            "betas": [0.9, 0.999],
                            "sched": {"name": "LinearAnnealingWithWarmUp", "warmup_steps": 1,
                                      "max_steps": spec["steps"]}}},
        "model_alignment_strategy": {"dpo": {"kl_beta": 0.1, "loss_type": "sigmoid",
                                             "max_prompt_length": seq // 2, "precompute_ref_log_probs": True,
                                             "truncation_mode": "keep_start"}},
        "precision": {"type": spec.get("precision", "fp32")},
        "runner": {"device": spec["device"], "cache_dir": str(work / "cache"), "attention": spec.get("attention", "auto"),
                   "data": {"padding": "dynamic", "shuffle": True, "packing": packing, "prefix_sharing": sharing}},
    }
    (work / "bench.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    trainer = Trainer(load_recipe(work / "bench.yaml", device=spec["device"]), spec["device"])
    t0 = time.perf_counter()
    trainer.setup()  # tokenize, build, precompute reference log-probs (TRL does the same in its setup)
    setup_s = time.perf_counter() - t0
    positions: list[int] = []
    trainer.model.get_decoder().register_forward_pre_hook(
        lambda mod, args, kw: positions.append(kw["input_ids"].numel()), with_kwargs=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, tokens_all, tokens_real = [], [], []
    for step in range(spec["steps"]):
        positions.clear()
        _sync(cuda)
        t = time.perf_counter()
        batch = trainer.global_batch(step)
        vals = trainer.train_step(step)
        _sync(cuda)
        times.append(time.perf_counter() - t)
        tokens_all.append(sum(positions))
        tokens_real.append(sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in batch))
    out = _summary(times, spec["warmup"], pairs, tokens_all, tokens_real)
    from recipe_runner.model.attention import attention_implementation

    out.update(_memory(cuda), setup_incl_precompute_s=round(setup_s, 2),
               settings=f"layout={spec['layout']} (packing={packing}, prefix_sharing={sharing}), "
                        f"attention={attention_implementation(trainer.model)}, precision={recipe['precision']['type']}, "
                        f"response-only LM head, chunked log-probs, precomputed reference, dynamic padding")
    out["loss_last"] = round(vals["reduced_train_loss"], 6)
    return out


def run_trl(spec: dict, work: Path) -> dict:
    """The same steps with TRL's DPOTrainer (precompute_ref_log_probs, like its anchor harness)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    shape, seq, pairs, cuda = spec["shape"], spec["seq"], spec["pairs"], spec["device"] == "cuda"
    cfg = config_dict(shape, seq)
    cfg.pop("model_type"), cfg.pop("architectures")
    torch.manual_seed(spec["seed"])
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.set_default_dtype(dtype)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    torch.set_default_dtype(torch.float32)
    tok = make_tokenizer(cfg["vocab_size"])
    rows = make_rows(pairs * (spec["steps"] + 2), cfg["vocab_size"], seq, spec["lengths"], seed=spec["seed"] + 1)
    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=pairs, max_steps=spec["steps"],
                     max_length=seq, precompute_ref_log_probs=True, precompute_ref_batch_size=pairs,
                     gradient_checkpointing=bool(spec.get("grad_ckpt")), bf16=cuda, learning_rate=1e-6,
                     logging_steps=spec["steps"], report_to=[], save_strategy="no", use_cpu=not cuda,
                     dataloader_num_workers=0, disable_tqdm=True, seed=spec["seed"])
    times: list[float] = []
    marks: list[float] = []
    positions: list[int] = []
    real: list[int] = []
    counting = [False]

    def count(mod, a, kw):
        ids = kw.get("input_ids", a[0] if a else None)
        if counting[0] and torch.is_grad_enabled() and ids is not None:
            positions.append(ids.numel())
            mask = kw.get("attention_mask")
            real.append(int(mask.sum()) if mask is not None else ids.numel())

    class Clock(TrainerCallback):
        # like the anchor harness: a step is the time between consecutive step ends (data
        # loading and TRL's own bookkeeping included, as they are in ours)
        def on_step_begin(self, *a, **k):
            if not counting[0]:
                counting[0] = True
                _sync(cuda)
                marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            _sync(cuda)
            marks.append(time.perf_counter())
            times.append(marks[-1] - marks[-2])
            step_all.append(sum(positions))
            step_real.append(sum(real))
            positions.clear(), real.clear()

    step_all: list[int] = []
    step_real: list[int] = []
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Clock()])
    model.register_forward_pre_hook(count, with_kwargs=True)
    setup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()  # the reference precompute happens at the start of train(), before step 1's clock
    out = _summary(times, spec["warmup"], pairs, step_all, step_real)
    out.update(_memory(cuda), setup_incl_precompute_s=round(setup_s, 2),
               settings="TRL DPOTrainer, precompute_ref_log_probs, pad to longest in batch"
                        + (", bf16 weights" if cuda else ", fp32"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out["loss_last"] = round(losses[-1], 6) if losses else None
    return out
