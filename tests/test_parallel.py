"""vspw_ray.parallel.map_videos: results in job order; a pool only where the frames pay for it."""

from __future__ import annotations

import os

from vspw_ray.parallel import MIN_FRAMES_PER_PROCESS, map_videos


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def test_a_few_frames_run_in_the_callers_process_and_many_in_a_pool():
    jobs = [(i,) for i in range(6)]
    small = list(map_videos(_pid_and_square, jobs, processes=2, frames=[8] * 6))
    assert [sq for _, sq in small] == [i * i for i in range(6)]
    assert {pid for pid, _ in small} == {os.getpid()}  # 48 frames: no pool
    done = []
    large = list(map_videos(_pid_and_square, jobs, processes=2,
                            frames=[MIN_FRAMES_PER_PROCESS // 2] * 6,
                            progress=lambda d, t: done.append((d, t))))
    assert [sq for _, sq in large] == [i * i for i in range(6)]  # in job order
    assert os.getpid() not in {pid for pid, _ in large}  # 3 processes' worth, capped at 2
    assert done == [(d, 6) for d in range(1, 7)]
