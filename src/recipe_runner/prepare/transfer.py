"""What every download shares: retries, progress lines, free-space checks, the per-destination lock.

Init containers run unattended and their output is read through `kubectl logs`, so every retry is
printed, progress is a line per ~10% when stderr is not a terminal (tqdm's carriage returns would
fill the log with one giant line), and a full disk says how much was needed and where.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from recipe_runner.errors import UserError

T = TypeVar("T")

# Bounded exponential backoff: 1, 2, 4, 8 s between 5 attempts (about 15 s of waiting in all).
ATTEMPTS = 5
BASE_DELAY_S = 1.0
MAX_DELAY_S = 30.0
QUIET_BELOW = 8 << 20  # no progress lines for files smaller than this


class TransientError(Exception):
    """A failure that may go away when tried again: dropped connection, 5xx, throttling."""


def with_retries(action: Callable[[], T], what: str, attempts: int | None = None) -> T:
    """Run `action`, retrying TransientError with exponential backoff; print every retry.

    Anything else (a UserError, a bug) goes straight through: retrying a 404 only wastes time.
    """
    attempts = attempts or ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except TransientError as e:
            if attempt == attempts:
                raise UserError(
                    f"{what}: gave up after {attempts} attempts; last error: {e}. "
                    "The source or the network is failing; check connectivity from the pod and run again."
                ) from e
            delay = min(MAX_DELAY_S, BASE_DELAY_S * 2 ** (attempt - 1))
            print(f"{what}: attempt {attempt}/{attempts} failed ({e}); retrying in {delay:g}s", file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def human_bytes(n: float | None) -> str:
    if n is None:
        return "unknown size"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


class LineProgress:
    """Progress for logs: one line per 10% (or every 30 s when the total is unknown)."""

    def __init__(self, total: int | None, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self._next_pct, self._last_time = 10, time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        if self.total is not None and self.total < QUIET_BELOW:
            return
        if self.total:
            pct = 100 * self.done // self.total
            if pct >= self._next_pct and pct < 100:
                print(f"{self.desc}: {pct}% ({human_bytes(self.done)} of {human_bytes(self.total)})", file=sys.stderr, flush=True)
                self._next_pct = (pct // 10 + 1) * 10
        elif time.monotonic() - self._last_time >= 30:
            self._last_time = time.monotonic()
            print(f"{self.desc}: {human_bytes(self.done)} so far", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.total is not None and self.total < QUIET_BELOW:
            return  # configs and tokenizer files: a line each would drown the shards' progress
        print(f"{self.desc}: done ({human_bytes(self.done)})", file=sys.stderr, flush=True)


@contextmanager
def progress(total: int | None, desc: str) -> Iterator[Callable[[int], None]]:
    """Yield an `update(n_bytes)` callable: a tqdm bar on a terminal, LineProgress otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, mininterval=1.0)
    else:
        bar = LineProgress(total, desc)
    try:
        yield bar.update
    finally:
        bar.close()


def check_free_space(directory: Path, needed: int | None) -> None:
    """Fail before downloading when the destination cannot hold the data."""
    if not needed:
        return
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise UserError(
            f"not enough disk space in {directory}: need {human_bytes(needed)}, {human_bytes(free)} free. "
            "Give the volume more room (e.g. a larger PVC / FSx) or point `dest` elsewhere."
        )


@contextmanager
def disk_full_is_user_error(directory: Path, needed: int | None) -> Iterator[None]:
    """Turn ENOSPC raised anywhere inside into a UserError that names the size and the place."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise UserError(
            f"disk full while writing into {directory} (needed {human_bytes(needed)}, "
            f"{human_bytes(shutil.disk_usage(directory).free)} free now). "
            "Give the volume more room (e.g. a larger PVC / FSx) or point `dest` elsewhere."
        ) from e


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold `<path>.lock` so that pods starting together do the work once.

    The first pod does the work; the others wait here, then find the manifest and skip. The
    lock is an OS file lock (flock), released by the kernel when its holder dies, so a killed
    pod never leaves a stale lock behind (the empty .lock file itself stays; it is harmless).
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"{what}: another process is working on {path}; waiting for it", file=sys.stderr, flush=True)
        while True:
            try:
                lock.acquire(timeout=60)
                break
            except Timeout:
                print(f"{what}: still waiting for the lock {path}.lock", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        lock.release()


def make_parent(path: Path) -> None:
    """Create the parent directory, saying what to fix when the volume is not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise UserError(f"cannot create {path.parent}: permission denied. Check the volume mount and the pod's "
                        "securityContext (runAsUser / fsGroup) so that this container may write there.") from e


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file through a temp name in the same directory, then rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
