"""Reading a run's metrics.jsonl into series and summary numbers, for `recipe-runner report`.

The trainer appends one JSON object per logged step (training names like reduced_train_loss)
and, in the same file, validation objects whose names start with `val_`. A record may be cut
short when the file is read while the run is still writing; that last line is skipped, not an
error, so `report` works on a live run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from recipe_runner.errors import UserError

# metric -> which way is better (min/max), or None where "best" means nothing (lr, norms).
TRAIN_METRICS: dict[str, str | None] = {
    "reduced_train_loss": "min",
    "nll_loss": "min",
    "log_odds_ratio": "max",
    "log_odds_chosen": "max",
    "chosen_rewards": None,
    "rejected_rewards": None,
    "reward_margin": "max",
    "reward_accuracy": "max",
    "chosen_logps": None,
    "rejected_logps": None,
    "lr": None,
    "gradient_norm": None,
    "parameter_norm": None,
    "throughput": "max",
    "throughput_peak": "max",
    "tokens_per_s": "max",
}
VAL_METRICS: dict[str, str | None] = {
    "val_loss": "min",
    "val_reduced_train_loss": "min",
    "val_nll_loss": "min",
    "val_log_odds_ratio": "max",
    "val_chosen_rewards": None,
    "val_rejected_rewards": None,
    "val_reward_margin": "max",
    "val_reward_accuracy": "max",
}


@dataclass
class RunMetrics:
    """Training and validation records, each sorted by step (a repeated step keeps its last record)."""

    path: Path
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    skipped_lines: list[int] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, leaving out records without a finite number for it."""
        records = self.val if key.startswith("val_") else self.train
        steps, values = [], []
        for r in records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(int(r["step"]))
                values.append(float(v))
        return steps, values

    def has(self, key: str) -> bool:
        return bool(self.series(key)[0])


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_metrics(path: Path) -> RunMetrics:
    """Parse metrics.jsonl; UserError when it is missing or holds no records."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path} not found: RUN_DIR must be a training run directory (the trainer writes metrics.jsonl "
            "there on rank 0 at every log step; see exp_manager.explicit_log_dir in the recipe)"
        )
    result = RunMetrics(path=path)
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            result.skipped_lines.append(number)
            continue
        step = int(record["step"])
        metrics = {k: v for k, v in record.items() if k != "step"}
        if any(k.startswith("val_") for k in metrics):
            val.setdefault(step, {"step": step}).update({k: v for k, v in metrics.items() if k.startswith("val_")})
        if any(not k.startswith("val_") for k in metrics):
            train[step] = {"step": step, **{k: v for k, v in metrics.items() if not k.startswith("val_")}}
    result.train = [train[s] for s in sorted(train)]
    result.val = [val[s] for s in sorted(val)]
    if not result.train and not result.val:
        raise UserError(
            f"{path} has no metric records: the run has not logged its first step yet "
            "(or the file is not a recipe-runner metrics.jsonl). Re-run report once training has logged a step"
        )
    return result


@dataclass
class MetricSummary:
    key: str
    first: float
    last: float
    last_step: int
    best: float | None = None
    best_step: int | None = None


def summarize_metric(metrics: RunMetrics, key: str, direction: str | None) -> MetricSummary | None:
    """First, last and best value of one metric; None when the run never logged it."""
    steps, values = metrics.series(key)
    if not steps:
        return None
    summary = MetricSummary(key, first=values[0], last=values[-1], last_step=steps[-1])
    if direction in ("min", "max"):
        pick = min if direction == "min" else max
        i = pick(range(len(values)), key=values.__getitem__)
        summary.best, summary.best_step = values[i], steps[i]
    return summary


def steady_throughput(metrics: RunMetrics) -> float | None:
    """Mean pairs/s leaving out the first logged step, whose time includes graph compilation."""
    _, values = metrics.series("throughput")
    values = values[1:] if len(values) > 1 else values
    return sum(values) / len(values) if values else None


def load_provenance(run_dir: Path) -> dict | None:
    """provenance.json as written by the trainer, or None when absent or unreadable (a report
    of the metrics is still worth writing without it)."""
    path = Path(run_dir) / "provenance.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
