"""`recipe-runner report RUN_DIR`: plots of a run's metrics and a short report.md.

Reads RUN_DIR/metrics.jsonl (and provenance.json when present), draws one PNG per group of
metrics the run actually logged (loss, rewards, accuracy, log-probs, ORPO odds, lr, gradient
norm, throughput, validation), and writes report.md with first/last/best values, the final
validation numbers, provenance and links to the plots. Works on a finished or a running run.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

from recipe_runner.deploy.run_metrics import (
    TRAIN_METRICS,
    VAL_METRICS,
    RunMetrics,
    load_metrics,
    load_provenance,
    steady_throughput,
    summarize_metric,
)
from recipe_runner.errors import UserError

# file, title, panels; a panel is (y label, [(metric, legend label), ...]). Only panels with data
# are drawn and only plots with a drawn panel are written.
PLOTS: list[tuple[str, str, list[tuple[str, list[tuple[str, str]]]]]] = [
    ("loss.png", "Training loss", [("loss", [("reduced_train_loss", "loss"), ("nll_loss", "NLL loss (ORPO)")])]),
    ("rewards.png", "Implicit rewards", [("reward", [("chosen_rewards", "chosen"), ("rejected_rewards", "rejected"),
                                                     ("reward_margin", "margin")])]),
    ("reward_accuracy.png", "Reward accuracy", [("accuracy", [("reward_accuracy", "reward accuracy")])]),
    ("logps.png", "Policy log-probabilities", [("log p", [("chosen_logps", "chosen"), ("rejected_logps", "rejected")])]),
    ("orpo.png", "ORPO odds ratio", [("log odds", [("log_odds_ratio", "log odds ratio"), ("log_odds_chosen", "log odds chosen")])]),
    ("lr.png", "Learning rate", [("lr", [("lr", "learning rate")])]),
    ("grad_norm.png", "Gradient norm", [("norm", [("gradient_norm", "gradient norm")])]),
    ("throughput.png", "Throughput", [("pairs/s", [("throughput", "pairs/s")]), ("tokens/s", [("tokens_per_s", "tokens/s")])]),
    ("validation.png", "Validation", [
        ("loss", [("val_loss", "val loss"), ("val_reduced_train_loss", "val loss"), ("val_nll_loss", "val NLL loss")]),
        ("reward accuracy", [("val_reward_accuracy", "val reward accuracy")]),
        ("margin", [("val_reward_margin", "val reward margin")]),
    ]),
]
PROVENANCE_FIELDS = [("recipe_sha256", "recipe hash"), ("recipe_hash", "recipe hash"), ("git_commit", "git commit"),
                     ("recipe_path", "recipe"), ("algorithm", "algorithm"), ("device", "device"),
                     ("world_size", "world size"), ("seed", "seed"), ("time", "started"), ("host", "host")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="training run directory (holds metrics.jsonl, provenance.json)")
    parser.add_argument("--out", help="where to write the PNGs and report.md (default RUN_DIR/report)")


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if run_dir.is_file() and run_dir.name == "metrics.jsonl":
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: pass the run's directory (it holds metrics.jsonl)")
    out = Path(args.out) if args.out else run_dir / "report"
    report = write_report(run_dir, out)
    print(report)
    return 0


def write_report(run_dir: Path, out: Path) -> Path:
    """Plots and report.md for `run_dir` into `out`; returns report.md's path."""
    metrics = load_metrics(run_dir / "metrics.jsonl")
    if metrics.skipped_lines:
        shown = ", ".join(map(str, metrics.skipped_lines[:5]))
        print(f"warning: skipped {len(metrics.skipped_lines)} unreadable line(s) of {metrics.path} (line {shown})",
              file=sys.stderr)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report directory {out}: {e}; pass a writable --out DIR") from e
    plots = [(name, title) for name, title, panels in PLOTS if draw_plot(metrics, out / name, title, panels)]
    text = render_markdown(run_dir, metrics, plots, load_provenance(run_dir))
    path = out / "report.md"
    _write_atomic(path, text.encode())
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def draw_plot(metrics: RunMetrics, path: Path, title: str, panels) -> bool:
    """One PNG with a panel per metric group that has data; False (and no file) when none has."""
    drawn = [(ylabel, [(k, label) for k, label in lines if metrics.has(k)]) for ylabel, lines in panels]
    drawn = [(ylabel, lines) for ylabel, lines in drawn if lines]
    if not drawn:
        if path.exists():
            path.unlink()  # a re-run must not keep a plot whose data is gone
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas: no pyplot global state and no display needed.
    fig = Figure(figsize=(7, 2.6 * len(drawn) + 0.6), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(drawn), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, lines) in zip(axes, drawn):
        for key, label in lines:
            steps, values = metrics.series(key)
            ax.plot(steps, values, label=label, marker="o" if len(steps) <= 30 else None, markersize=3)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(lines) > 1:
            ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _write_atomic(path, buffer.getvalue())
    return True


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metric_table(metrics: RunMetrics, names: dict[str, str | None]) -> list[str]:
    rows = ["| metric | first | last | best (step) |", "|---|---|---|---|"]
    for key, direction in names.items():
        s = summarize_metric(metrics, key, direction)
        if s is None:
            continue
        best = f"{_fmt(s.best)} ({s.best_step})" if s.best is not None else "—"
        rows.append(f"| {key} | {_fmt(s.first)} | {_fmt(s.last)} | {best} |")
    return rows if len(rows) > 2 else []


def _provenance_rows(provenance: dict) -> list[str]:
    rows = ["| field | value |", "|---|---|"]
    seen_labels = set()
    for key, label in PROVENANCE_FIELDS:
        value = provenance.get(key)
        if value in (None, "") or label in seen_labels:
            continue
        seen_labels.add(label)
        rows.append(f"| {label} | `{value}` |")
    versions = provenance.get("versions")
    if isinstance(versions, dict) and versions:
        rows.append("| versions | " + ", ".join(f"{k} {v}" for k, v in versions.items()) + " |")
    return rows if len(rows) > 2 else []


def render_markdown(run_dir: Path, metrics: RunMetrics, plots: list[tuple[str, str]], provenance: dict | None) -> str:
    lines = [f"# Run report: {run_dir.resolve().name}", "", f"- Run directory: `{run_dir.resolve()}`"]
    if metrics.train:
        first, last = metrics.train[0], metrics.train[-1]
        lines.append(f"- Training steps logged: {len(metrics.train)} (step {first['step']} to {last['step']})")
        if isinstance(last.get("consumed_samples"), (int, float)):
            lines.append(f"- Consumed samples: {int(last['consumed_samples'])}")
        steady = steady_throughput(metrics)
        if steady is not None:
            lines.append(f"- Mean throughput after the first logged step (which includes compilation): {steady:.4g} pairs/s")
    lines.append(f"- Validation evaluations: {len(metrics.val)}")
    table = _metric_table(metrics, TRAIN_METRICS)
    if table:
        lines += ["", "## Training metrics", "", *table]
    if metrics.val:
        final = metrics.val[-1]
        lines += ["", f"## Final validation (step {final['step']})", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(float(v))} |" for k, v in final.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        best = _metric_table(metrics, VAL_METRICS)
        if best and len(metrics.val) > 1:
            lines += ["", "Validation over the run:", "", *best]
    if provenance:
        rows = _provenance_rows(provenance)
        if rows:
            lines += ["", "## Provenance", "", *rows]
    if plots:
        lines += ["", "## Plots", ""]
        for name, title in plots:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines).rstrip() + "\n"
