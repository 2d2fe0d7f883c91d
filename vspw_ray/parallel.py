"""One helper to run a function over videos in worker processes, in order, with progress."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["map_videos", "MIN_FRAMES_PER_PROCESS"]

# A worker process costs a few CPU-seconds to start (it imports numpy, pyarrow and often torch),
# the time of scoring some 30 frames: below this many frames a process, a pool is slower than
# the caller's own process (4 CamVid videos of 8 frames: 6.1 s in two processes, 3.3 s in one)
MIN_FRAMES_PER_PROCESS = 64


def map_videos(fn: Callable[..., T], jobs: Sequence[tuple], *, processes: int | None = None,
               progress: Callable[[int, int], Any] | None = None,
               frames: Sequence[int] | None = None) -> Iterator[T]:
    """Yield ``fn(*job)`` for each job in order, using up to ``processes`` processes (default:
    every core). Results stream back one at a time, so memory stays flat in the number of jobs.
    ``progress(done, total)`` is called after each job. ``frames`` (each job's frame count)
    caps the processes at one per :data:`MIN_FRAMES_PER_PROCESS` frames: a small job list runs
    in the caller's process."""
    workers = min(processes or os.cpu_count() or 1, max(len(jobs), 1))
    if frames is not None:
        workers = min(workers, max(1, sum(frames) // MIN_FRAMES_PER_PROCESS))
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
