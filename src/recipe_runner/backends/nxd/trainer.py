"""The xla Trainer with neuronx-distributed tensor parallelism (tp > 1). Neuron DLC only;
verified only on Trn1 (nothing here runs without NxD and NeuronCores).

What changes against XlaTrainer:
- process groups: torch.distributed on the `xla` backend (NxD builds its groups on it), then
  NxD's initialize_model_parallel through neuronx_distributed_config; `self.dist` holds the
  DATA-parallel coordinates (rank r sees the r-th slice of each global batch);
- the model: ParallelLlama (model.py) built on the CPU, loaded from this rank's converted file
  (exp_manager.resume_from_checkpoint must be the NxD layout: run `convert-checkpoint`), moved
  to the device by NxD (initialize_parallel_model), layers checkpointed per
  model.activations_checkpoint_granularity: full;
- log-probs: vocab-parallel over the tp group (vocab_parallel.py), identical on all tp ranks;
- the optimizer: NxD's wrapper (initialize_parallel_optimizer) around the recipe's AdamW, which
  all-reduces sequence-parallel norm gradients over tp, averages gradients over dp (or
  reduce-scatters them with ZeRO-1, distributed_strategy.zero1), clips, and reports the norm;
- reference log-probs: every data-parallel rank scores the whole set once (cached), so no
  CPU-tensor collective is needed on the xla backend;
- checkpoints: NxD's sharded format (nxd.save_checkpoint), the converter's layout per tp rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from recipe_runner.backends.nxd.plan import checkpoint_file, layer_plan, rank_coords
from recipe_runner.backends.nxd.vocab_parallel import vocab_parallel_sequence_logprobs
from recipe_runner.backends.xla import XlaTrainer, xla_autocast
from recipe_runner.errors import UserError
from recipe_runner.prepare.nxd_layout import Parallel, llama_dims
from recipe_runner.train import checkpoint as ckpt
from recipe_runner.train.distributed import Dist
from recipe_runner.train.metrics import say


class NxdTrainer(XlaTrainer):
    def __init__(self, recipe):  # replaces Trainer.__init__: the world is tp x dp, not dp
        import torch.distributed as dist
        import torch_xla.distributed.xla_backend  # noqa: F401 - registers the `xla` process-group backend
        from neuronx_distributed.parallel_layers import parallel_state
        from neuronx_distributed.trainer import neuronx_distributed_config

        from recipe_runner.backends.xla import _xla

        self._tx, self._xm, self._pl, self._xr = _xla()
        self.r, self.device_name, self.static = recipe, "xla", True
        ds, t, d = recipe.distributed_strategy, recipe.trainer, recipe.data
        if ds.pipeline_model_parallel_size != 1:
            raise UserError("distributed_strategy.pipeline_model_parallel_size > 1 is not supported (NxDT's pipeline "
                            "path bypasses the DPO/ORPO loss too): use tensor parallelism, pipeline_model_parallel_size=1")
        if recipe.algorithm == "dpo" and not recipe.alignment.precompute_ref_log_probs:
            raise UserError("with tensor parallelism the reference log-probs must be precomputed (as in NxDT): "
                            "set model_alignment_strategy.dpo.precompute_ref_log_probs=true")
        if not dist.is_initialized():
            dist.init_process_group("xla", init_method="xla://")
        world = dist.get_world_size()
        if world != recipe.world_size:
            raise UserError(f"trainer.devices x trainer.num_nodes = {recipe.world_size} but this run has {world} processes: "
                            f"launch with torchrun --nproc_per_node {t.devices} --nnodes {t.num_nodes}")
        clip = t.gradient_clip_val or 0.0
        self.nxd_config = neuronx_distributed_config(
            tensor_parallel_size=ds.tensor_model_parallel_size, pipeline_parallel_size=1,
            optimizer_config={"zero_one_enabled": ds.zero1, "grad_clipping": clip > 0, "max_grad_norm": clip or 1.0},
            sequence_parallel=ds.sequence_parallel,
            mixed_precision_config={"use_master_weights": recipe.precision.type == "bf16SR",
                                    "use_fp32_grad_acc": recipe.precision.type == "bf16SR",
                                    "use_master_weights_in_ckpt": False})
        self.coords = rank_coords(dist.get_rank(), world, ds.tensor_model_parallel_size)
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_size()
        self.dist = Dist(rank=dp_rank, world=dp_size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        self.global_rank = dist.get_rank()
        self.main = self.global_rank == 0
        self.device = self._tx.device()
        self.autocast = xla_autocast(recipe.precision.type)
        self.gbs, self.mbs = d.global_batch_size, d.micro_batch_size
        if self.gbs % (self.mbs * dp_size):
            raise UserError(f"data.global_batch_size {self.gbs} is not divisible by micro_batch_size {self.mbs} x "
                            f"{dp_size} data-parallel ranks")
        self.local_batch = self.gbs // dp_size
        self.pad_to = d.seq_length
        self._loader = None
        from recipe_runner.data.packing import MAX_PAIRS_PER_ROW
        from recipe_runner.train.metrics import METRIC_KEYS, ORPO_KEYS

        self.keys = METRIC_KEYS + (ORPO_KEYS if recipe.algorithm == "orpo" else ())
        # packed rows as in Trainer.__init__: the parallel attention takes the block mask and
        # position ids, and self.logprobs sums per segment across the vocab-split LM head
        self.packing, self.sharing = recipe.runner.data.packing, recipe.runner.data.prefix_sharing
        self.pack_width = 2 * d.seq_length
        self.pairs_per_forward = self.mbs * MAX_PAIRS_PER_ROW
        self.ddp = None
        self._reducers = None

    # ------------------------------------------------------------------ model
    def _build(self):
        from recipe_runner.backends.nxd.model import ParallelLlama
        from recipe_runner.model.build import checkpoint_kind, load_config
        from recipe_runner.prepare.nxd_io import load_rank_file

        r, ds = self.r, self.r.distributed_strategy
        config = load_config(r)
        par = Parallel(ds.tensor_model_parallel_size, 1, ds.kv_replicator, r.model.qkv_linear, r.model.fuse_qkv)
        plan = layer_plan(llama_dims(config), par)
        start = r.exp_manager.resume_from_checkpoint
        if checkpoint_kind(start) != "nxd":
            raise UserError(f"exp_manager.resume_from_checkpoint: {start} is not in the NxD layout; tensor parallelism "
                            f"loads per-rank shards: run `recipe-runner convert-checkpoint RECIPE` first")
        torch.manual_seed(r.seed)
        model = ParallelLlama(plan, config, sequence_parallel=ds.sequence_parallel,
                              checkpoint_layers=r.model.activations_checkpoint_granularity == "full")
        state = dict(load_rank_file(Path(start) / "model" / checkpoint_file(self.coords)))
        model.load_state_dict(state, strict=True)
        return model

    def setup(self) -> None:
        """Trainer.setup (data, model, reference, optimizer, scheduler, provenance in one place);
        the model and optimizer come through the seams below."""
        from recipe_runner.backends.nxd.model import tp_reducers

        self._reducers = tp_reducers()
        super(XlaTrainer, self).setup()  # Trainer.setup

    def _build_model(self):
        """The parallel Llama through NxD's initialize_parallel_model."""
        from neuronx_distributed.trainer import initialize_parallel_model

        return initialize_parallel_model(self.nxd_config, self._build)

    def _build_optimizer(self):
        """NxD's initialize_parallel_optimizer (ZeRO-1 per the recipe) around the same optimizer
        class, parameter groups and hyper-parameters as the core's build_optimizer."""
        from neuronx_distributed.trainer import initialize_parallel_optimizer

        from recipe_runner.train import optim

        o, r = self.r.model.optim, self.r
        cls = {"adamw_fp32OptState": optim.NxdtAdamW, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[o.name]
        groups = optim.param_groups(self.model, o.weight_decay, r.model.do_layer_norm_weight_decay)
        return initialize_parallel_optimizer(self.nxd_config, cls, groups, lr=o.lr, betas=tuple(o.betas),
                                             eps=optim.DEFAULT_EPS[o.name] if o.eps is None else o.eps,
                                             weight_decay=o.weight_decay)

    def _setup_reference(self, tok: dict) -> None:
        """Whole-set precompute on every dp rank (no CPU collectives on the xla backend); the
        scoring is vocab-parallel through Trainer.score -> self.logprobs."""
        from recipe_runner.train import loop

        dist, self.dist = self.dist, Dist(rank=self.global_rank, world=1)
        try:
            loop.Trainer._setup_reference(self, tok)
        finally:
            self.dist = dist

    def logprobs(self, hidden, weight, labels, **segments):
        reduce_max, reduce_sum = self._reducers
        return vocab_parallel_sequence_logprobs(hidden, weight, labels, self.model.vocab_start(),
                                                reduce_max=reduce_max, reduce_sum=reduce_sum, **segments)

    # ------------------------------------------------------------------ optimizer, metrics
    def _reduce_metrics(self, acc):
        from neuronx_distributed.parallel_layers import parallel_state

        if self.dist.world == 1:
            return acc
        return self._xm.all_reduce(self._xm.REDUCE_SUM, acc, groups=parallel_state.get_data_parallel_group(as_list=True))

    def _optimizer_step(self):
        self.optimizer.step()  # NxD: sequence-parallel + dp reduction, clipping, ZeRO-1
        norm = self.optimizer.grad_norm
        return norm if norm is not None else torch.zeros((), device=self.device)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        import neuronx_distributed as nxd

        em = self.r.exp_manager
        if not em.create_checkpoint_callback:
            return
        cp = em.checkpoint_callback_params
        name = ckpt.checkpoint_name(cp.filename, name=self.r.name, step=self.step, consumed_samples=self.consumed)
        root = self.run_dir / "checkpoints"
        nxd.save_checkpoint(str(root), tag=name, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                            user_content={"step": self.step, "consumed_samples": self.consumed}, use_xser=em.save_xser,
                            num_kept_ckpts=cp.save_top_k if cp.save_top_k > 0 else None)
        say(f"checkpoint saved (NxD layout): {root / name}", self.main)

    def _resume(self) -> None:
        """The newest complete NxD checkpoint of this run (save() above writes them), loaded on
        every rank through nxd.load_checkpoint: model shards, optimizer (ZeRO-1) state, scheduler."""
        if not self.r.exp_manager.resume_if_exists:
            return
        root = self.run_dir / "checkpoints"
        newest = newest_nxd_checkpoint(root)
        if newest is None:
            return
        import neuronx_distributed as nxd

        content = nxd.load_checkpoint(str(root), tag=newest.name, model=self.model, optimizer=self.optimizer,
                                      scheduler=self.scheduler)
        self.step, self.consumed = content["step"], content["consumed_samples"]
        say(f"resumed from {newest} (NxD layout, step {self.step})", self.main)


def newest_nxd_checkpoint(root: Path) -> Path | None:
    """The complete NxD checkpoint (`done` marker, written last by nxd.save_checkpoint) with the
    highest step in its user_content.pt; None when there is none. A save killed half-way has no
    `done` and is skipped, as NxD's own loader does."""
    found = []
    for d in (root.iterdir() if root.is_dir() else ()):
        if d.is_dir() and (d / "done").is_file() and (d / "user_content.pt").is_file():
            found.append((int(torch.load(d / "user_content.pt", weights_only=True)["step"]), d.name, d))
    return max(found)[2] if found else None

