"""Reading the trainer's progress lines back into numbers, for `recipe-runner watch`.

The trainer prints one line per logged step on rank 0, e.g.

    step 10/200 | consumed_samples 40 | loss 0.6931 | ... | throughput 3.21 pairs/s | elapsed 0:01:02

and validation lines that start with `validation step N | ` and use `val_` names. The parser is
generic (`name value` fields split on ` | `) so a field added to the trainer later shows up
here without a code change; only the compact summary picks names it knows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_STEP_RE = re.compile(r"^(?P<kind>validation\s+)?step\s+(?P<step>\d+)(?:\s*/\s*(?P<max>\d+))?$")
_NUMBER_RE = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|^[-+]?(?:nan|inf)", re.IGNORECASE)

# Lines that are not progress lines but that a user waiting on a run wants to see: the
# minutes-long Neuron compile and the model/dataset download are otherwise silent in `watch`.
_PASS_THROUGH_RE = re.compile(
    r"compil|neff|neuron_parallel_compile|download|fetch|reference log-?probs|loading checkpoint"
    r"|saving checkpoint|checkpoint saved|resum|traceback|error|exception|killed|out of memory",
    re.IGNORECASE,
)


@dataclass
class ProgressLine:
    """One parsed progress line: `fields` holds floats where the value is a number, else text."""

    step: int
    max_steps: int | None
    validation: bool
    fields: dict[str, float | str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    def number(self, *names: str) -> float | None:
        """The first of `names` present as a number (the trainer may rename a field over time)."""
        for name in names:
            value = self.fields.get(name)
            if isinstance(value, float):
                return value
        return None


def parse_duration(text: str) -> float | None:
    """'1:02:03' / '0:01:02' / '62.5s' / '1 day, 2:00:00' -> seconds; None when not a duration."""
    text = text.strip()
    days = 0.0
    m = re.match(r"^(\d+)\s+days?,\s*(.*)$", text)
    if m:
        days, text = float(m.group(1)), m.group(2)
    if text.endswith("s") and _NUMBER_RE.match(text[:-1]):
        return days * 86400 + float(text[:-1])
    parts = text.split(":")
    if len(parts) not in (2, 3):
        return None
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        return None
    seconds = 0.0
    for n in numbers:
        seconds = seconds * 60 + n
    return days * 86400 + seconds


def format_duration(seconds: float) -> str:
    """Seconds -> 'H:MM:SS' (or 'Nd H:MM:SS'), the way the trainer prints elapsed time."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    text = f"{h}:{m:02d}:{s:02d}"
    return f"{days}d {text}" if days else text


def parse_progress_line(line: str) -> ProgressLine | None:
    """Parse one log line; None when it is not a progress or validation line."""
    parts = [p.strip() for p in line.strip().split(" | ")]
    if not parts:
        return None
    m = _STEP_RE.match(parts[0])
    if not m:
        return None
    result = ProgressLine(
        step=int(m.group("step")),
        max_steps=int(m.group("max")) if m.group("max") else None,
        validation=bool(m.group("kind")),
    )
    for part in parts[1:]:
        name, _, value = part.partition(" ")
        value = value.strip()
        if not name or not value:
            continue
        if name in ("elapsed", "eta"):
            seconds = parse_duration(value)
            result.fields[name] = seconds if seconds is not None else value
            continue
        number = _NUMBER_RE.match(value)
        if number and (number.end() == len(value) or value[number.end()] == " "):
            result.fields[name] = float(number.group(0))
            unit = value[number.end():].strip()
            if unit:
                result.units[name] = unit
        else:
            result.fields[name] = value
    return result


def is_pass_through(line: str) -> bool:
    """True for log lines about compile/download progress or errors, shown as they are."""
    return bool(_PASS_THROUGH_RE.search(line))


class EtaEstimator:
    """Estimates time left from the step rate.

    The rate is measured between the first and the latest progress line, using the trainer's own
    `elapsed` field when it is there (so replayed logs give the same answer as live ones) and the
    wall clock of arrival otherwise. Measuring from the first *seen* line leaves out the graph
    compilation before step 1, which would make the ETA far too pessimistic on Neuron.
    """

    def __init__(self) -> None:
        self._first: tuple[int, float] | None = None
        self._last: tuple[int, float] | None = None

    def update(self, progress: ProgressLine, now: float) -> float | None:
        """Record a training progress line seen at wall time `now`; return seconds left or None."""
        elapsed = progress.number("elapsed")
        clock = elapsed if elapsed is not None else now
        point = (progress.step, clock)
        if self._first is None or progress.step < self._first[0]:
            self._first = point  # first line, or the run restarted from an earlier step
        self._last = point
        if progress.max_steps is None:
            return None
        remaining_steps = max(0, progress.max_steps - progress.step)
        first_step, first_clock = self._first
        samples = progress.number("consumed_samples")
        throughput = progress.number("throughput")
        if remaining_steps == 0:
            return None
        if progress.step > first_step and clock > first_clock:
            seconds_per_step = (clock - first_clock) / (progress.step - first_step)
        elif samples and throughput and progress.step > 0:
            seconds_per_step = samples / progress.step / throughput  # one line only: its own rate
        elif elapsed is not None and progress.step > 0 and elapsed > 0:
            seconds_per_step = elapsed / progress.step  # includes start-up and compile time
        else:
            return None
        return remaining_steps * seconds_per_step


def _fmt(value: float | None, spec: str) -> str | None:
    return None if value is None else format(value, spec)


def summarize(progress: ProgressLine, eta_seconds: float | None = None) -> str:
    """A compact one-line status: step, loss, rewards, accuracy, throughput, ETA."""
    if progress.validation:
        head = f"validation @ step {progress.step}"
        prefix = "val_"
    else:
        head = f"step {progress.step}" + (f"/{progress.max_steps}" if progress.max_steps else "")
        if progress.max_steps:
            head += f" ({100.0 * progress.step / progress.max_steps:.0f}%)"
        prefix = ""
    pieces = [head]

    def add(label: str, spec: str, *names: str) -> None:
        text = _fmt(progress.number(*(prefix + n for n in names)), spec)
        if text is not None:
            pieces.append(f"{label} {text}")

    add("loss", ".4f", "loss", "reduced_train_loss")
    add("nll", ".4f", "nll_loss")
    add("log_odds", ".4f", "log_odds_ratio")
    chosen = _fmt(progress.number(prefix + "chosen_rewards"), "+.4f")
    rejected = _fmt(progress.number(prefix + "rejected_rewards"), "+.4f")
    if chosen is not None or rejected is not None:
        pieces.append(f"rewards chosen {chosen or '?'} rejected {rejected or '?'}")
    add("margin", "+.4f", "reward_margin")
    add("acc", ".3f", "reward_accuracy")
    if not progress.validation:
        throughput = progress.number("throughput")
        if throughput is not None:
            pieces.append(f"{throughput:.2f} {progress.units.get('throughput', 'pairs/s')}")
        tokens = progress.number("tokens/s", "tokens_per_s")
        if tokens is not None:
            pieces.append(f"{tokens:.0f} tokens/s")
        elapsed = progress.number("elapsed")
        if elapsed is not None:
            pieces.append(f"elapsed {format_duration(elapsed)}")
        if eta_seconds is not None:
            pieces.append(f"ETA {format_duration(eta_seconds)}")
    return " | ".join(pieces)
