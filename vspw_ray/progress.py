"""Progress lines for long work: ``label  done/total  rate/s  ETA``, at most one a second."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["progress_printer", "format_duration"]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def progress_printer(label: str, unit: str = "videos", stream=None,
                     min_interval: float = 1.0) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback that prints to stderr."""
    stream = stream or sys.stderr
    start = time.monotonic()
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < min_interval:
            return
        last[0] = now
        elapsed = now - start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        print(f"{label}: {done}/{total} {unit}  {rate:.1f} {unit}/s  "
              f"elapsed {format_duration(elapsed)}  ETA {format_duration(eta)}", file=stream,
              flush=True)

    return report
