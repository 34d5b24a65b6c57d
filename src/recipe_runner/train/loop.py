"""The training loop: recipe -> data -> model -> reference log-probs -> steps -> metrics,
validation, checkpoints. Readable in one sitting on purpose; the math lives in model/.

Batching: the order of pairs is a seeded permutation per epoch, and optimizer step s always
takes pairs [s*G, (s+1)*G) of its epoch's permutation (G = global_batch_size). Rank r of D takes
the r-th slice of those, in micro-batches of micro_batch_size. The data position is therefore a
function of the step alone, which is what makes a resumed run identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from collections import deque
from pathlib import Path

import torch

from recipe_runner.data.batches import collate_pairs, epoch_order, limit_batches
from recipe_runner.data.cache import cache_key
from recipe_runner.data.packing import MAX_PAIRS_PER_ROW, group_pairs, pack_pairs
from recipe_runner.data.dataset import load_tokenized, load_tokenizer
from recipe_runner.data.tokenize import pad_token_id
from recipe_runner.errors import UserError
from recipe_runner.model.build import build_model, fingerprint
from recipe_runner.model.attention import choose_attention, packed_pair_logprobs, set_attention
from recipe_runner.model.logprobs import sequence_logprobs
from recipe_runner.model.losses import dpo_loss, orpo_loss
from recipe_runner.recipe.checks import not_used_on
from recipe_runner.train import checkpoint as ckpt
from recipe_runner.train import reference
from recipe_runner.train.distributed import all_reduce_sum, barrier, data_parallel, init_distributed, shutdown
from recipe_runner.train.metrics import METRIC_KEYS, ORPO_KEYS, MetricsLogger, host_metrics, metric_vector, say
from recipe_runner.train.optim import build_optimizer
from recipe_runner.train.precision import make_autocast, param_dtype
from recipe_runner.train.provenance import resolve_run_dir, write_provenance
from recipe_runner.train.schedulers import build_scheduler


class Trainer:
    def __init__(self, recipe, device_name: str):
        self.r = recipe
        self.device_name = device_name
        self.dist = init_distributed(device_name)
        self.main = self.dist.is_main
        if self.dist.world != recipe.world_size:
            raise UserError(
                f"trainer.devices x trainer.num_nodes = {recipe.world_size} but this run has {self.dist.world} "
                f"process(es): set trainer.devices={self.dist.world} (key=value override) or launch with "
                f"torchrun --nproc_per_node {recipe.trainer.devices}")
        self.device = torch.device("cuda", self.dist.local_rank) if device_name == "cuda" else torch.device("cpu")
        self.autocast = make_autocast(device_name, recipe.precision.type)
        d = recipe.data
        self.gbs, self.mbs = d.global_batch_size, d.micro_batch_size
        if self.gbs % (self.mbs * self.dist.world):
            raise UserError(f"data.global_batch_size {self.gbs} is not divisible by micro_batch_size {self.mbs} x "
                            f"{self.dist.world} data-parallel processes")
        self.local_batch = self.gbs // self.dist.world
        self.pad_to = d.seq_length if recipe.runner.data.padding == "static" else None
        self.static = device_name == "xla"
        # several pairs per row / each prompt once (data/packing.py); same numbers. A packed row is
        # 2 x seq_length wide, room for any pair as [prompt | chosen | rejected], and a forward has
        # micro_batch_size of them: the tokens of the unpacked [2 x micro_batch_size, seq_length].
        self.packing, self.sharing = recipe.runner.data.packing, recipe.runner.data.prefix_sharing
        self.pack_width = 2 * d.seq_length
        self.pairs_per_forward = self.mbs * MAX_PAIRS_PER_ROW  # static shapes only
        self.ddp = None  # DistributedDataParallel over the policy call under torchrun (setup)
        self.keys = METRIC_KEYS + (ORPO_KEYS if recipe.algorithm == "orpo" else ())

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        r, d = self.r, self.r.data
        self.run_dir = resolve_run_dir(r, self.dist)
        self.cache_dir = r.runner.cache_dir or str(self.run_dir / "cache")
        unused = not_used_on(r, self.device_name)
        if unused:
            say(f"not used on {self.device_name}: {', '.join(unused)}", self.main)
        say(f"run directory: {self.run_dir}", self.main)
        self.tokenizer = load_tokenizer(d.tokenizer.type, r.runner.trust_remote_code)
        self.pad_id = pad_token_id(self.tokenizer)
        al = r.alignment
        tok = dict(seq_length=d.seq_length, max_prompt_length=al.max_prompt_length,
                   truncation_mode=al.truncation_mode, skip_invalid=r.runner.data.skip_invalid,
                   cache_dir=self.cache_dir)
        # rank 0 tokenizes and fills the cache; the others then read it
        for turn in ((True,) if self.dist.world == 1 else (self.main, not self.main)):
            if turn:
                self.train_ex, report = load_tokenized(d.train_dir, self.tokenizer,
                                                       dev_choose_samples=d.dev_choose_samples, **tok)
                self.val_ex = []
                if d.val_dir and r.trainer.limit_val_batches != 0:
                    self.val_ex, val_report = load_tokenized(d.val_dir, self.tokenizer, **tok)
            barrier(self.dist)
        say(f"train data {d.train_dir}: {report.summary()}", self.main)
        if self.val_ex:
            say(f"validation data {d.val_dir}: {val_report.summary()}", self.main)
        self.steps_per_epoch = len(self.train_ex) // self.gbs
        if self.steps_per_epoch == 0:
            raise UserError(f"data.train_dir has {len(self.train_ex)} usable pairs, fewer than one global batch "
                            f"({self.gbs}): add data or lower data.global_batch_size")
        t = r.trainer
        limits = [s for s in (t.max_steps, t.max_epochs * self.steps_per_epoch if t.max_epochs > 0 else -1) if s > 0]
        self.max_steps = min(limits)

        self.model = self._build_model()
        self.model.train()
        self.ddp = self._data_parallel()
        if self.ddp is not None:
            say(f"data parallel: {self.dist.world} processes, DistributedDataParallel "
                f"({torch.distributed.get_backend()})", self.main)
        self.start_fp = fingerprint(r.exp_manager.resume_from_checkpoint, extra=r.model.model_config_path)
        self._setup_reference(tok)
        o = r.model.optim
        self.optimizer = self._build_optimizer()
        sched = dict(o.sched, max_steps=self.max_steps)  # NxDT: always trainer.max_steps
        self.scheduler = build_scheduler(self.optimizer, sched.pop("name"), **sched)
        self.step, self.consumed = 0, 0
        self._resume()
        write_provenance(self.run_dir, r, self.dist, device=self.device_name, tokenizer=self.tokenizer,
                         model_config=self.model.config, start_fingerprint=self.start_fp, enabled=self.main)
        self.logger = MetricsLogger(str(self.run_dir), enabled=self.main,
                                    tensorboard=r.exp_manager.create_tensorboard_logger, resume_step=self.step)

    def _resume(self) -> None:
        """Continue from this run's newest complete checkpoint (resume_if_exists), or with
        weight_init_only: false from another run's (a seam: NxD keeps its own layout)."""
        r = self.r
        latest = ckpt.latest_checkpoint(self.run_dir) if r.exp_manager.resume_if_exists else None
        start = r.exp_manager.resume_from_checkpoint
        if latest is None and not r.model.weight_init_only and start and (Path(start) / ckpt.STATE_FILE).is_file():
            latest = Path(start)  # continues the other run's optimizer, schedule and step
        if latest is not None:
            state = ckpt.load_checkpoint(latest, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            self.step, self.consumed = state["step"], state["consumed_samples"]
            say(f"resumed from {latest} (step {self.step})", self.main)

    def _build_model(self) -> torch.nn.Module:
        """The policy on the device (a seam: tensor parallelism builds a parallel model)."""
        dtype = param_dtype(self.device_name, self.r.precision.type)
        model = build_model(self.r, trust_remote_code=self.r.runner.trust_remote_code,
                            init_device=self.device if self.device.type == "cuda" else "cpu", init_dtype=dtype)
        block_mask = self.packing or self.sharing
        set_attention(model, choose_attention(self.r.runner.attention, self.device_name, block_mask))
        return model.to(device=self.device, dtype=dtype)

    def _data_parallel(self):
        """DDP over the policy's log-prob call under torchrun (a seam: XLA reduces gradients itself)."""
        return data_parallel(self.model, self.policy_logprobs, self.dist, self.device)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW per the recipe (a seam: NxD wraps it for ZeRO-1)."""
        o = self.r.model.optim
        return build_optimizer(self.model, name=o.name, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                               eps=o.eps, exclude_norm_weights=self.r.model.do_layer_norm_weight_decay)

    def score(self, model, input_ids, attention_mask, labels, **_) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-prob sums and counts of any model (policy or reference) with this
        backend's log-prob function; what reference precompute and the frozen copy use."""
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.logprobs(hidden, model.get_output_embeddings().weight, labels)

    def _setup_reference(self, tok: dict) -> None:
        self.ref_model, self.ref_tables = None, {}
        if self.r.algorithm != "dpo":
            return
        if not self.r.alignment.precompute_ref_log_probs:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            return
        settings = {k: v for k, v in tok.items() if k != "cache_dir"}
        settings["dev_choose_samples"] = self.r.data.dev_choose_samples  # a table of 8 pairs can't serve 12
        for split, examples, path in (("train", self.train_ex, self.r.data.train_dir),
                                      ("val", self.val_ex, self.r.data.val_dir)):
            if not examples:
                continue
            key = cache_key(path, self.tokenizer, settings)[:16]
            file = Path(self.cache_dir) / f"reflogps-{split}-{self.start_fp}-{key}-{self.device_name}-{self.r.precision.type}.safetensors"
            self.ref_tables[split] = reference.precompute(
                self.model, examples, batch_size=self.mbs, device=self.device, pad_id=self.pad_id, pad_to=self.pad_to,
                autocast=self.autocast, dist=self.dist, cache_file=str(file), log=lambda m: say(m, self.main),
                static_shapes=self.static, score=self.score)

    # ------------------------------------------------------------------ one micro-batch
    def device_batch(self, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask, labels of a micro-batch on the device (a seam: the xla
        backend hands out batches its parallel loader already moved)."""
        batch = collate_pairs(examples, pad_id=self.pad_id, pad_to=self.pad_to)
        return tuple(batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels"))

    def logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **segments):
        """Sequence (or, packed, segment) log-prob sums and counts (a seam: tensor parallelism
        splits the LM head)."""
        return sequence_logprobs(hidden, weight, labels, static_shapes=self.static, **segments)

    def policy_logprobs(self, examples: list[dict]) -> dict:
        """The policy's summed log-probs and counts, rows 0..B-1 chosen and B..2B-1 rejected;
        with ORPO's `nll_scope: sequence` also the chosen sequences' prompt+response sums.
        Packed / prefix-shared rows give the same numbers (tested)."""
        b, al = len(examples), self.r.alignment
        full_scope = self.r.algorithm == "orpo" and al.nll_scope == "sequence"
        if self.packing or self.sharing:
            packed = self._pack(examples)
            with self.autocast():
                lp = packed_pair_logprobs(self.model, packed, device=self.device, full_chosen=full_scope,
                                          logprobs=self.logprobs)
            return {**lp, "packed": packed}
        ids, mask, labels = self.device_batch(examples)
        with self.autocast():
            hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            weight = self.model.get_output_embeddings().weight
            sums, counts = self.logprobs(hidden, weight, labels)
            out = {"sums": sums, "counts": counts, "tokens": mask.sum()}
            if full_scope:  # TRL/paper: prompt and response tokens of the chosen sequence
                full = torch.where(mask[:b].bool(), ids[:b], torch.full_like(ids[:b], -100))
                out["full_sums"], out["full_counts"] = self.logprobs(hidden[:b], weight, full)
        return out

    def reference_logprobs(self, examples: list[dict], split: str, packed=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference sums: from the precomputed table by sample id, or from the
        frozen copy of the starting model when precompute is off."""
        if self.ref_model is None:
            return reference.lookup(self.ref_tables[split], [e["id"] for e in examples], self.device)
        b = len(examples)
        with torch.no_grad(), self.autocast():
            if packed is not None:
                ref = packed_pair_logprobs(self.ref_model, packed, device=self.device, logprobs=self.logprobs)
                return ref["sums"][:b], ref["sums"][b:]
            out = reference.pair_logprobs(self.ref_model, examples, device=self.device, pad_id=self.pad_id,
                                          pad_to=self.pad_to, autocast=self.autocast, static_shapes=self.static,
                                          score=self.score)
        return out["chosen"], out["rejected"]

    def pair_metrics(self, examples: list[dict], split: str) -> dict[str, torch.Tensor]:
        """Per-pair losses and metrics for a micro-batch (the graph is kept for backward)."""
        b, al = len(examples), self.r.alignment
        grads = self.ddp is not None and torch.is_grad_enabled()
        lp = self.ddp(examples) if grads else self.policy_logprobs(examples)
        pc, pr = lp["sums"][:b], lp["sums"][b:]
        # counts >= 1: a padding pair (xla, weight 0) scores no token, and 0/0 would poison sums
        lc, lr = lp["counts"][:b].float().clamp(min=1), lp["counts"][b:].float().clamp(min=1)
        if self.r.algorithm == "dpo":
            rc, rr = self.reference_logprobs(examples, split, lp.get("packed"))
            out = dpo_loss(pc, pr, rc, rr, beta=al.kl_beta, loss_type=al.loss_type,
                           label_smoothing=al.label_smoothing, chosen_lengths=lc, rejected_lengths=lr)
        else:
            mc, mr = pc / lc, pr / lr
            nll = -lp["full_sums"] / lp["full_counts"].float().clamp(min=1) if "full_sums" in lp else -mc  # NxDT: response only
            out = orpo_loss(mc, mr, nll, beta=al.beta)
        out["reward_margin"] = out["chosen_rewards"] - out["rejected_rewards"]
        # a margin inside fp32 rounding of the sums (their last bits depend on the batch's padding
        # width) is a tie, so policy == reference gives accuracy 0 whatever the batch composition
        tie = 1e-6 * (pc.abs() + pr.abs()).detach() * (al.kl_beta if self.r.algorithm == "dpo" else al.beta)
        out["reward_accuracy"] = (out["reward_margin"] > tie).float()
        out["chosen_logps"], out["rejected_logps"] = pc.detach(), pr.detach()
        out["tokens"] = lp["tokens"].float().expand(1)
        return out

    def _pack(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Packed rows of a forward's pairs; XLA always gets micro_batch_size full-width rows.
        Padding pairs (weight 0, flagged by the xla backend, always last) keep their output slots
        but take no tokens."""
        real = [e for e in examples if not e.get("padding")]
        assert all(not e.get("padding") for e in examples[:len(real)]), "padding pairs come last"
        rows = self.mbs if self.static else None
        return pack_pairs(real, pad_id=self.pad_id, width=self.pack_width, share_prefix=self.sharing,
                          pack=self.packing, num_rows=rows, trim=not self.static, num_pairs=len(examples))

    def micro_batches(self, examples: list[dict]) -> list[list[dict]]:
        """The pairs of each forward: micro_batch_size of them, or with packing as many as fill
        micro_batch_size rows of 2 x seq_length (the unpacked micro-batch's tokens)."""
        if not self.packing:
            return [examples[s:s + self.mbs] for s in range(0, len(examples), self.mbs)]
        return group_pairs(examples, max_rows=self.mbs, width=self.pack_width, share_prefix=self.sharing,
                           max_pairs=self.pairs_per_forward if self.static else None)

    # ------------------------------------------------------------------ metrics on the device
    metric_dtype = torch.float64  # sums of many pairs' metrics; the xla backend uses float32
    grads_to_none = True  # the xla backend keeps gradient buffers (one graph for every step)

    def metric_vector(self, out: dict, weight: torch.Tensor | None = None) -> torch.Tensor:
        return metric_vector(out, self.keys, self.metric_dtype, weight)

    def _reduce_metrics(self, acc: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks; every rank reduces, even one with no pairs (a seam)."""
        return all_reduce_sum(acc, self.dist)

    def _to_host(self, acc: torch.Tensor, n_pairs: int) -> dict[str, float]:
        return host_metrics(acc, self.keys, n_pairs)

    def _synced(self) -> None:
        """After each forward (a seam: the xla backend cuts its graph here)."""

    def _optimizer_step(self) -> torch.Tensor:
        """Clip and step; the gradient norm (a seam: XLA reduces gradients here, NxD in its optimizer)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.r.trainer.gradient_clip_val
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else float("inf"))
        self.optimizer.step()
        return grad_norm

    def _step_values(self, step: int, acc: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> dict[str, float]:
        """The step's metrics on the host (a seam: XLA fetches them at log steps only)."""
        return dict(self._to_host(acc, self.gbs), lr=lr, gradient_norm=float(grad_norm))

    # ------------------------------------------------------------------ loop
    def global_batch(self, step: int) -> list[dict]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_ex), self.r.seed, epoch, self.r.runner.data.shuffle)
        chosen = order[pos * self.gbs:(pos + 1) * self.gbs]
        mine = chosen[self.dist.rank * self.local_batch:(self.dist.rank + 1) * self.local_batch]
        return [self.train_ex[i] for i in mine]

    def forwards(self, examples: list[dict], *, val: bool = False) -> list[tuple[list[dict], torch.Tensor | None]]:
        """The pairs of each forward and their weights (None: all count). Validation pairs are
        split over ranks here (a seam: XLA pads every forward to one shape)."""
        if val:
            examples = examples[self.dist.rank::self.dist.world]
        return [(chunk, None) for chunk in self.micro_batches(examples)]

    def train_step(self, step: int) -> dict[str, float]:
        forwards = self.forwards(self.global_batch(step))
        acc = torch.zeros(len(self.keys) + 1, dtype=self.metric_dtype, device=self.device)
        for i, (chunk, weight) in enumerate(forwards):
            # DDP all-reduces in the last micro-batch's backward only; it averages over ranks, so
            # each rank's loss is the mean over its own pairs (one process: the global batch)
            last = self.ddp is None or i == len(forwards) - 1
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                out = self.pair_metrics(chunk, "train")
                loss = out["loss"] if weight is None else out["loss"] * weight
                (loss.sum() / self.local_batch).backward()
            acc = acc + self.metric_vector(out, weight)
            self._synced()
        acc = self._reduce_metrics(acc)
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = self._optimizer_step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=self.grads_to_none)
        return self._step_values(step, acc, grad_norm, lr)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.model.eval()
        examples = limit_batches(self.val_ex, self.r.trainer.limit_val_batches, self.mbs * self.dist.world)
        acc = torch.zeros(len(self.keys) + 1, dtype=self.metric_dtype, device=self.device)
        for chunk, weight in self.forwards(examples, val=True):
            acc = acc + self.metric_vector(self.pair_metrics(chunk, "val"), weight)
            self._synced()
        acc = self._reduce_metrics(acc)
        self.model.train()
        vals = self._to_host(acc, max(1, len(examples)))
        vals.pop("tokens", None)
        return {f"val_{k.replace('reduced_train_loss', 'loss')}": v for k, v in vals.items()}

    def _val_due(self, step: int) -> bool:
        interval = self.r.trainer.val_check_interval
        every = max(1, round(interval * self.steps_per_epoch)) if isinstance(interval, float) else interval
        return bool(self.val_ex) and step % every == 0 and step < self.max_steps

    def save(self) -> None:
        em = self.r.exp_manager
        if not em.create_checkpoint_callback:
            return
        if self.main:
            cp = em.checkpoint_callback_params
            name = ckpt.checkpoint_name(cp.filename, name=self.r.name, step=self.step, consumed_samples=self.consumed)
            path = ckpt.save_checkpoint(self.run_dir, name, model=self.model, optimizer=self.optimizer,
                                        scheduler=self.scheduler, save_top_k=cp.save_top_k,
                                        state={"step": self.step, "consumed_samples": self.consumed})
            say(f"checkpoint saved: {path}")
        barrier(self.dist)

    def run(self) -> Path:
        self.setup()
        r, em = self.r, self.r.exp_manager
        every_ckpt = em.checkpoint_callback_params.every_n_train_steps
        if self.step >= self.max_steps:
            say(f"nothing to do: step {self.step} already reached max_steps {self.max_steps}", self.main)
            self._close()
            return self.run_dir
        if self.step == 0 and self.val_ex:  # the baseline: policy == reference, rewards 0, accuracy 0
            self.logger.log(0, self.max_steps, self.validate(), prefix="val_")
        times: deque[float] = deque(maxlen=10)
        peak = 0.0
        while self.step < self.max_steps:
            t0 = time.perf_counter()
            vals = self.train_step(self.step)
            self.step += 1
            self.consumed += self.gbs
            times.append(time.perf_counter() - t0)
            mean_t = sum(times) / len(times)
            peak = max(peak, self.gbs / mean_t)
            if self.step % r.trainer.log_every_n_steps == 0 or self.step == self.max_steps:
                if em.log_parameter_norm:
                    vals["parameter_norm"] = torch.sqrt(sum((p.detach().float() ** 2).sum()
                                                            for p in self.model.parameters())).item()
                vals.update(consumed_samples=self.consumed, throughput=self.gbs / mean_t, throughput_peak=peak,
                            tokens_per_s=vals.pop("tokens") / times[-1])
                if not em.log_gradient_norm:
                    vals.pop("gradient_norm")
                self.logger.log(self.step, self.max_steps, vals, eta=(self.max_steps - self.step) * mean_t)
            if self._val_due(self.step):
                self.logger.log(self.step, self.max_steps, self.validate(), prefix="val_")
            if self.step % every_ckpt == 0 and self.step < self.max_steps:
                self.save()
        if self.val_ex:
            self.logger.log(self.step, self.max_steps, self.validate(), prefix="val_")
        saved = ckpt.list_checkpoints(self.run_dir)
        if not saved or saved[-1][0] < self.step:
            self.save()
        self._close()
        return self.run_dir

    def _close(self) -> None:
        """Flush the logs; release DDP's reducer before the process group it talks through goes
        (the other order can abort a rank at exit), then leave together."""
        self.logger.close()
        if self.ddp is not None:
            self.ddp = None
            gc.collect()  # DDP's hooks hold references in cycles: free the reducer now, not at exit
        shutdown(self.dist)
