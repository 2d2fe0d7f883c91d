"""The ensemble's thin Ray shell: run a plain function over shards of videos as Ray tasks."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from vspw_ray.errors import UserError

__all__ = ["parallelism", "ray_map"]

T = TypeVar("T")


def parallelism(address: str | None) -> int:
    """CPUs to spread shards and trials over: the cluster's, or on a local instance (which
    declares more logical CPUs than the machine has) this machine's cores."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, cpus if address else min(cpus, os.cpu_count() or 1))


def _call(fn: Callable[[Any], T], job: Any) -> T:
    return fn(job)


def ray_map(fn: Callable[[Any], T], jobs: Sequence[Any]) -> Iterator[T]:
    """``fn(job)`` for each job as a Ray task (1 CPU each), results in job order. A task that
    fails on bad input re-raises that error as it is (its message names the member, video or
    frame), the other tasks are cancelled."""
    import ray

    remote = ray.remote(num_cpus=1)(_call)
    refs = [remote.remote(fn, job) for job in jobs]
    for i, ref in enumerate(refs):
        try:
            yield ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            for rest in refs[i + 1:]:
                ray.cancel(rest)
            cause = getattr(err, "cause", None)
            if isinstance(cause, (UserError, FileNotFoundError)):
                raise cause from None
            raise
