"""Rules that need the whole recipe, and the list of keys a device does not use.

Each rule returns (dotted key, message with the fix). They run after the schema has typed every
value, so they can compare numbers freely.
"""

from __future__ import annotations

from recipe_runner.recipe.schema import Recipe

OPTIMIZERS = ("adamw_fp32OptState", "adamw", "adam")

# Keys that only a Trainium/XLA run reads; on cpu/cuda they are accepted and listed once.
XLA_ONLY = (
    "distributed_strategy.tensor_model_parallel_size", "distributed_strategy.pipeline_model_parallel_size",
    "distributed_strategy.virtual_pipeline_model_parallel_size", "distributed_strategy.zero1",
    "distributed_strategy.sequence_parallel", "distributed_strategy.kv_replicator",
    "model.qkv_linear", "model.fuse_qkv", "model.fusions", "model.use_cpu_initialization",
    "precision.master_weights", "precision.fp32_grad_acc", "precision.xla_use_bf16",
    "precision.xla_downcast_bf16", "precision.neuron_rt_stochastic_rounding_en",
    "compiler_flags", "compiler_cache_url", "aync_exec_max_inflight_requests", "bucket_size_collectives",
    "neuron_rt_exec_timeout", "neuron_experimental_compress_rg",
    "exp_manager.save_xser", "exp_manager.load_xser", "exp_manager.save_bf16",
    "exp_manager.checkpoint_callback_params.model_parallel_size",
    "exp_manager.checkpoint_callback_params.use_master_weights_in_ckpt",
)
# NxDT keys that change nothing in this engine on any device (PTL/NeMo plumbing).
NEVER_USED = (
    "model_source", "trainer.check_val_every_n_epoch", "trainer.num_sanity_val_steps", "trainer.limit_test_batches",
    "exp_manager.log_local_rank_0_only", "exp_manager.enable_recovery_time_instrumentation",
    "exp_manager.async_checkpointing", "exp_manager.ckpt_ptl_version", "exp_manager.resume_ignore_no_checkpoint",
    "model.encoder_seq_length", "model.activations_checkpoint_recompute",
    "exp_manager.checkpoint_callback_params.monitor", "exp_manager.checkpoint_callback_params.mode",
    "exp_manager.checkpoint_callback_params.save_last", "model.optim.capturable",
)


def not_used_on(recipe: Recipe, device: str) -> list[str]:
    """Keys written in the recipe that have no effect on `device` (printed once at start)."""
    ignored = NEVER_USED + (() if device == "xla" else XLA_ONLY + ("precision.type",) * (device == "cpu"))
    unused = sorted(k for k in recipe.explicit_keys if any(k == i or k.startswith(i + ".") for i in ignored))
    return _collapse(unused, recipe.explicit_keys)


def _collapse(keys: list[str], written: frozenset) -> list[str]:
    """`section.*` when every key written under a section is unused, to keep the line short."""
    out: list[str] = []
    for key in keys:
        head = key.split(".")[0]
        if "." in key and all(k in keys for k in written if k.startswith(head + ".")):
            if f"{head}.*" not in out:
                out.append(f"{head}.*")
        else:
            out.append(key)
    return out


def cross_checks(recipe: Recipe, device: str) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    add = lambda key, msg: problems.append((key, msg))  # noqa: E731
    t, d, ds, m = recipe.trainer, recipe.data, recipe.distributed_strategy, recipe.model

    # alignment: exactly one algorithm
    mas = recipe.model_alignment_strategy
    if (mas.dpo is None) == (mas.orpo is None):
        add("model_alignment_strategy", "set exactly one of `dpo:` or `orpo:` under model_alignment_strategy")
        return problems
    algo = recipe.algorithm
    al = recipe.alignment
    if al.max_prompt_length >= d.seq_length:
        add(f"model_alignment_strategy.{algo}.max_prompt_length",
            f"{al.max_prompt_length} must be smaller than data.seq_length ({d.seq_length}), or responses get no "
            f"tokens: lower it (NxDT's recipes use half of seq_length)")
    if algo == "dpo" and mas.dpo.label_smoothing > 0 and mas.dpo.loss_type != "sigmoid":
        add("model_alignment_strategy.dpo.label_smoothing", "label smoothing applies to loss_type: sigmoid only")

    # length of training
    if t.max_steps <= 0 and t.max_epochs <= 0:
        add("trainer.max_steps", "set trainer.max_steps (or trainer.max_epochs) to a positive number")
    if isinstance(t.val_check_interval, float) and not 0 < t.val_check_interval <= 1:
        add("trainer.val_check_interval", "a float is a fraction of an epoch in (0, 1]; use an int for steps")

    # parallel layout: the recipe's own numbers must agree with each other
    mp = recipe.model_parallel_size
    if recipe.world_size % mp:
        add("distributed_strategy.tensor_model_parallel_size",
            f"tensor ({ds.tensor_model_parallel_size}) x pipeline ({ds.pipeline_model_parallel_size}) parallel size "
            f"must divide trainer.devices x trainer.num_nodes ({recipe.world_size}): change one of them")
    else:
        dp = recipe.world_size // mp
        if d.global_batch_size % (d.micro_batch_size * dp):
            add("data.global_batch_size",
                f"{d.global_batch_size} is not divisible by micro_batch_size ({d.micro_batch_size}) x data-parallel "
                f"size ({dp} = {recipe.world_size} devices / {mp} model-parallel): use a multiple of "
                f"{d.micro_batch_size * dp}")
    cmp = recipe.exp_manager.checkpoint_callback_params.model_parallel_size
    if cmp is not None and cmp != mp:
        add("exp_manager.checkpoint_callback_params.model_parallel_size",
            f"{cmp} disagrees with tensor x pipeline parallel size ({mp}); use ${{multiply:...}} as NxDT does")
    if m.max_position_embeddings and d.seq_length > m.max_position_embeddings:
        add("data.seq_length", f"{d.seq_length} exceeds model.max_position_embeddings ({m.max_position_embeddings})")

    # optimizer and scheduler names
    if m.optim.name not in OPTIMIZERS:
        add("model.optim.name", f"unknown optimizer {m.optim.name!r}: use one of {', '.join(OPTIMIZERS)}")
    add_sched_problems(m.optim.sched, add)

    # device-specific
    if device == "xla" and recipe.runner.data.padding == "dynamic":
        add("runner.data.padding", "dynamic padding makes a new graph for every shape on xla: use static")
    if recipe.runner.attention == "flex_attention" and device != "cuda":
        add("runner.attention", f"flex_attention trains only on cuda (PyTorch's FlexAttention has no backward on "
                                f"cpu, and xla uses eager): use auto on {device}")
    pd = recipe.runner.prepare_data
    if pd is not None and pd.format == "fields" and not pd.fields:
        add("runner.prepare_data.fields", "format: fields needs a mapping, e.g. {prompt: question, chosen: good, rejected: bad}")
    return problems


def add_sched_problems(sched: dict, add) -> None:
    from recipe_runner.train import schedulers

    name = sched.get("name")
    key = "model.optim.sched"
    try:
        accepted = schedulers.scheduler_params(str(name))
    except ValueError as e:
        add(f"{key}.name", str(e))
        return
    import difflib

    for k in schedulers.required_params(str(name)):
        if k not in sched and k != "max_steps":  # max_steps always comes from trainer.max_steps
            add(f"{key}.{k}", f"scheduler {name} needs `{k}`: add it under model.optim.sched")
    for k in sched:
        if k != "name" and k not in accepted:
            close = difflib.get_close_matches(k, list(accepted), n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"{name} takes: {', '.join(accepted)}"
            add(f"{key}.{k}", f"unknown key for scheduler {name}: {hint}")
