"""What a user reads: one progress line per log step (newline-terminated, no carriage returns, so
`kubectl logs -f` stays readable), metrics.jsonl (one JSON object per logged step) and
TensorBoard scalars — all the same numbers, averaged over the whole global batch."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

# Per-pair metrics every step and validation reports (averaged over the pairs of the global batch).
METRIC_KEYS = ("reduced_train_loss", "chosen_rewards", "rejected_rewards", "reward_margin", "reward_accuracy",
               "chosen_logps", "rejected_logps")
ORPO_KEYS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")

# Order of the progress line: the seed's fields first, then ours.
LINE_ORDER = ("consumed_samples", "reduced_train_loss", "chosen_rewards", "rejected_rewards", "reward_margin",
              "reward_accuracy", "chosen_logps", "rejected_logps", "loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "lr", "parameter_norm",
              "gradient_norm", "throughput", "throughput_peak", "tokens_per_s")


def metric_vector(out: dict, keys: tuple[str, ...], dtype, weight=None):
    """A forward's per-pair metrics summed (padding pairs weigh 0), then its token count: [keys
    + 1] on the device. Summed there and read back once per step (host_metrics), since a host
    read per micro-batch would stall a GPU's queue and cut an XLA graph."""
    import torch

    src = {"reduced_train_loss": "loss"}
    per_pair = torch.stack([out[src.get(k, k)].detach().to(dtype) for k in keys])
    if weight is not None:
        per_pair = per_pair * weight
    return torch.cat([per_pair.sum(-1), out["tokens"].detach().reshape(1).to(dtype)])


def host_metrics(acc, keys: tuple[str, ...], n_pairs: int) -> dict[str, float]:
    """Means over n_pairs of a summed metric vector, and its token count, on the host."""
    v = acc.cpu().double().tolist()
    out = {k: v[i] / n_pairs for i, k in enumerate(keys)}
    out["tokens"] = v[-1]
    return out


def _fmt(key: str, v) -> str:
    if isinstance(v, int) or key == "consumed_samples":
        return str(int(v))
    if key == "lr":
        return f"{v:.3e}"
    if key in ("tokens_per_s",):
        return f"{v:.0f}"
    if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}"


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, max_steps: int, values: dict, elapsed: float, eta: float | None,
                  prefix: str = "") -> str:
    keys = [k for k in LINE_ORDER if f"{prefix}{k}" in values] + sorted(
        k[len(prefix):] for k in values if k.startswith(prefix) and k[len(prefix):] not in LINE_ORDER and k != "step")
    parts = [f"step {step}/{max_steps}"] + [f"{prefix}{k} {_fmt(k, values[prefix + k])}" for k in keys]
    parts.append(f"elapsed {_hms(elapsed)}")
    if eta is not None:
        parts.append(f"eta {_hms(eta)}")
    return ("validation " if prefix else "") + " | ".join(parts)


class MetricsLogger:
    """Writes on the main rank only. `resume_step` drops records a killed run logged after its
    last checkpoint, so a resumed run's metrics.jsonl equals an uninterrupted run's."""

    def __init__(self, run_dir: str, *, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.start = time.time()
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, max_steps: int, values: dict, *, prefix: str = "", eta: float | None = None) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k if not prefix else f"validation/{k}", v, step)
            self.writer.flush()
        print(progress_line(step, max_steps, values, time.time() - self.start, eta, prefix), flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def say(message: str, enabled: bool = True) -> None:
    """A plain status line on the main rank (preparation, compile, checkpoints)."""
    if enabled:
        print(message, file=sys.stdout, flush=True)
