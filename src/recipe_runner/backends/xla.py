"""The xla backend: the same Trainer on a torch-xla (PJRT) device -- NeuronCores in the Neuron
DLC, the CPU here (PJRT_DEVICE=CPU) -- changing only what XLA needs:

- Static shapes. Every sequence is padded to data.seq_length (the recipe check rejects dynamic
  padding on xla), every micro-batch has micro_batch_size pairs: the validation tail and the
  reference precompute tail are filled with repeats of a real pair that count zero. A new shape
  would be a new graph, i.e. a new compilation (minutes per graph for an 8B model on Neuron).
- Graph boundaries (torch_xla.sync): one after each micro-batch's forward+backward (the
  gradients accumulate in device buffers between graphs, so the graph does not grow with
  gradient accumulation) and one after the optimizer step (gradient all-reduce over data
  parallel replicas, clipping, AdamW, zeroing). Gradients are zeroed, not freed, so every
  micro-step after the first has the identical graph. Precompute and validation are forward-only
  graphs of the same batch shape.
- No host synchronisation inside a step: the per-pair metrics are summed into one device vector;
  it is read on the host only at log boundaries, in a step closure (xm.add_step_closure) that runs
  right after the step's graph was dispatched. The learning rate is a host float (torch-xla
  passes non-0/1 Python scalars as graph inputs, so a changing lr does not recompile).
- Batches come through torch-xla's parallel loader (MpDeviceLoader), which uploads the next
  micro-batches in a background thread while the current graph runs.
- bf16: `precision.type` mixed_precision/autocast run the matmuls under torch.autocast("xla",
  bfloat16) over fp32 weights, gradients and optimizer state (what NxDT gets from
  XLA_DOWNCAST_BF16 plus fp32 master weights; those flags are deprecated in torch-xla 2.9);
  fp32 runs in fp32 (and asks neuronx-cc for --auto-cast none); bf16SR casts the weights to bf16
  with Neuron's stochastic rounding on.
- Data parallelism: one process per device under torchrun (world = devices x num_nodes /
  (tp x pp)); gradients are averaged by xm.reduce_gradients over the PJRT replicas; host-side
  coordination (tokenizer cache, reference table, barriers) stays on the gloo group the core sets
  up. Tensor parallelism (tp x pp > 1) goes through backends/nxd (neuronx-distributed).
"""

from __future__ import annotations

import torch

from recipe_runner.backends.neuron_env import apply_neuron_env
from recipe_runner.data.batches import collate_pairs
from recipe_runner.errors import UserError
from recipe_runner.model.attention import set_attention
from recipe_runner.model.checkpointing import checkpoint
from recipe_runner.train.loop import Trainer
from recipe_runner.train.metrics import say


def _xla():
    """Import torch-xla lazily: apply_neuron_env must run before it initialises."""
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.distributed.parallel_loader as pl
    import torch_xla.runtime as xr

    return torch_xla, xm, pl, xr


def xla_autocast(precision: str):
    if precision in ("mixed_precision", "mixed_precisionSR", "autocast"):
        return lambda: torch.autocast("xla", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext


def install_xla_checkpointing(model: torch.nn.Module) -> None:
    """Route Hugging Face gradient checkpointing of `model` through the device-aware checkpoint
    (the engine's own chunked log-probs already use it)."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = checkpoint


def use_eager_attention(model: torch.nn.Module) -> None:
    """transformers' sdpa path reads the attention mask on the host to decide whether it may skip
    it (a sync, and a different graph for a batch without padding); its eager path always builds
    the mask. Numerically the same attention."""
    set_attention(model, "eager")


class _Feed:
    """A finite iterable of collated CPU micro-batches for MpDeviceLoader."""

    def __init__(self, chunks: list[list[dict]], pad_id: int, pad_to: int):
        self.chunks, self.pad_id, self.pad_to = chunks, pad_id, pad_to

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self):
        for c in self.chunks:
            b = collate_pairs(c, pad_id=self.pad_id, pad_to=self.pad_to)
            yield {k: b[k] for k in ("input_ids", "attention_mask", "labels")}


def pad_to_multiple(examples: list[dict], size: int, count: int | None = None) -> tuple[list[dict], list[float]]:
    """Examples padded with copies of the last one, flagged `padding` (packing gives them no
    tokens), to `count` (default: the next multiple of size), and weights 1 for real pairs, 0
    for the copies."""
    n = len(examples)
    count = count if count is not None else -(-n // size) * size
    if n == 0:
        return [], []
    return examples + [dict(examples[-1], padding=True)] * (count - n), [1.0] * n + [0.0] * (count - n)


class XlaTrainer(Trainer):
    def __init__(self, recipe):
        torch_xla, xm, pl, xr = _xla()
        self._tx, self._xm, self._pl, self._xr = torch_xla, xm, pl, xr
        super().__init__(recipe, "xla")
        if recipe.model_parallel_size > 1:
            raise UserError("tensor/pipeline parallel sizes > 1 need the neuronx-distributed backend; "
                            "run in the Neuron DLC (backends/nxd) or set distributed_strategy.tensor_model_parallel_size=1")
        self.device = torch_xla.device()
        self.autocast = xla_autocast(recipe.precision.type)
        self._loader = None

    # ------------------------------------------------------------------ data feed
    def _open_feed(self, chunks: list[list[dict]]):
        self._loader = iter(self._pl.MpDeviceLoader(_Feed(chunks, self.pad_id, self.pad_to), self.device))

    def device_batch(self, examples):
        if self._loader is None:
            return super().device_batch(examples)
        b = next(self._loader)
        return b["input_ids"], b["attention_mask"], b["labels"]

    def _setup_reference(self, tok: dict) -> None:
        # runs right after the model is built, before any forward: make attention XLA-friendly first
        use_eager_attention(self.model)
        super()._setup_reference(tok)

    def _data_parallel(self):
        return None  # replicas average gradients with xm.reduce_gradients (_optimizer_step)

    def setup(self) -> None:
        super().setup()
        install_xla_checkpointing(self.model)  # bf16SR weights are already bf16 (Trainer._build_model)

    # ------------------------------------------------------------------ the loop's seams
    metric_dtype = torch.float32  # NeuronCores have no float64
    grads_to_none = False  # gradient buffers stay: the same graph every step

    def forwards(self, examples: list[dict], *, val: bool = False):
        """One shape for every forward: micro_batch_size pairs (validation tails and ranks with
        fewer pairs padded with copies that weigh 0), or packed rows with a fixed number of pair
        slots. Unpacked forwards come through MpDeviceLoader; packed rows are built per forward."""
        if val:
            w = self.dist.world
            per_rank = -(-len(examples) // w)
            mine, weights = pad_to_multiple(examples[self.dist.rank::w], self.mbs, -(-per_rank // self.mbs) * self.mbs)
            plan = [(mine[s:s + self.mbs], weights[s:s + self.mbs]) for s in range(0, len(mine), self.mbs)]
        elif self.packing:  # as many pairs as fill micro_batch_size rows, in a fixed number of slots
            plan = [pad_to_multiple(g, self.pairs_per_forward, count=self.pairs_per_forward)
                    for g in self.micro_batches(examples)]
        else:
            plan = [(examples[s:s + self.mbs], None) for s in range(0, len(examples), self.mbs)]
        self._loader = None
        if not (self.packing or self.sharing):
            self._open_feed([chunk for chunk, _ in plan])
        return [(chunk, None if w is None else torch.tensor(w, device=self.device)) for chunk, w in plan]

    def _synced(self) -> None:
        self._tx.sync()  # graph: one micro-batch's forward (+ backward)

    def _log_due(self, step: int) -> bool:
        return (step + 1) % self.r.trainer.log_every_n_steps == 0 or step + 1 == self.max_steps

    def _step_values(self, step: int, acc: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> dict[str, float]:
        """Metrics reach the host in a step closure at log steps only (no sync inside the step)."""
        vals: dict[str, float] = {"lr": lr}
        if self._log_due(step):
            def fetch(a, g):
                vals.update(self._to_host(a, self.gbs), gradient_norm=g.cpu().item())
            self._xm.add_step_closure(fetch, (acc, grad_norm.detach()))
        self._tx.sync()  # graph: gradient reduce + clip + optimizer step
        return vals

    def _reduce_metrics(self, acc: torch.Tensor) -> torch.Tensor:
        """Sum a metric vector over the data-parallel replicas (on the device)."""
        xm = self._xm
        return xm.all_reduce(xm.REDUCE_SUM, acc) if self._xr.world_size() > 1 else acc

    def _optimizer_step(self) -> torch.Tensor:
        """Average gradients over replicas, clip, step; returns the gradient norm (device)."""
        if self._xr.world_size() > 1:
            self._xm.reduce_gradients(self.optimizer)
        return super()._optimizer_step()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Checkpoint files hold CPU tensors: the live model and optimizer stay on the device."""
        if not self.r.exp_manager.create_checkpoint_callback:
            return
        self._tx.sync()
        live_model, live_opt = self.model, self.optimizer
        cpu_model = _cpu_copy_module(live_model)
        try:
            self.model = cpu_model
            self.optimizer = _CpuStateOptimizer(live_opt)
            super().save()
        finally:
            self.model, self.optimizer = live_model, live_opt


def _cpu_copy_module(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to("cpu")


class _CpuStateOptimizer:
    """Presents an optimizer's state_dict with CPU tensors (what save_checkpoint writes)."""

    def __init__(self, opt):
        self._opt = opt

    def state_dict(self):
        def cpu(x):
            if isinstance(x, torch.Tensor):
                return x.detach().cpu()
            if isinstance(x, dict):
                return {k: cpu(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(cpu(v) for v in x)
            return x
        return cpu(self._opt.state_dict())


def train_xla(recipe) -> "object":
    """Train `recipe` on the XLA device; returns the run directory."""
    apply_neuron_env(recipe)
    if recipe.model_parallel_size > 1:
        from recipe_runner.backends.nxd import require_nxd

        require_nxd()
        from recipe_runner.backends.nxd.trainer import NxdTrainer

        return NxdTrainer(recipe).run()
    say(f"xla backend: {recipe.world_size} data-parallel process(es)", True)
    return XlaTrainer(recipe).run()
