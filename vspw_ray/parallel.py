"""One helper to run a function over videos in worker processes, in order, with progress."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["map_videos"]


def map_videos(fn: Callable[..., T], jobs: Sequence[tuple], *, processes: int | None = None,
               progress: Callable[[int, int], Any] | None = None) -> Iterator[T]:
    """Yield ``fn(*job)`` for each job in order, using up to ``processes`` processes (default:
    every core). Results stream back one at a time, so memory stays flat in the number of jobs.
    ``progress(done, total)`` is called after each job."""
    workers = min(processes or os.cpu_count() or 1, max(len(jobs), 1))
    if workers <= 1:
        for done, job in enumerate(jobs, 1):
            yield fn(*job)
            if progress:
                progress(done, len(jobs))
        return
    # forkserver, not fork: the caller may hold threads (Ray, gRPC, torch) that a fork would
    # copy mid-lock and deadlock on
    with ProcessPoolExecutor(max_workers=workers,
                             mp_context=multiprocessing.get_context("forkserver")) as pool:
        futures = [pool.submit(fn, *job) for job in jobs[: 2 * workers]]
        submitted = len(futures)
        for done in range(1, len(jobs) + 1):
            result = futures[done - 1].result()
            futures[done - 1] = None  # type: ignore[call-overload]  # free it
            if submitted < len(jobs):
                futures.append(pool.submit(fn, *jobs[submitted]))
                submitted += 1
            if progress:
                progress(done, len(jobs))
            yield result
