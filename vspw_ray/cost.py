"""What a run cost, measured: wall time x the Ray resources it held, logged on its MLflow run
as ``cost/wall_s``, ``cost/cpu_hours`` and ``cost/gpu_hours`` (added up over the invocations of
a resumed run), and summed over a parent's child runs (a pipeline's stages, a sweep's trials).

What each stage holds: training and SWA their workers (``train.num_workers`` x
``train.resources_per_worker``, one GPU each with ``train.use_gpu``) for the time ``fit`` runs;
a Tune trial the same plus its driver (``tune.driver_resources``); inference its model actors
for the time frames stream; the ensemble the CPUs its tasks are spread over for its search and
submission."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

__all__ = ["Held", "COST_KEYS", "resources_held", "train_held", "log_cost", "measured_cost",
           "run_cost", "sum_child_costs"]

COST_KEYS = ("cost/wall_s", "cost/cpu_hours", "cost/gpu_hours")


@dataclass(frozen=True)
class Held:
    """Ray resources held by a run while it runs."""

    cpus: float
    gpus: float = 0.0

    def __add__(self, other: Held) -> Held:
        return Held(self.cpus + other.cpus, self.gpus + other.gpus)

    def metrics(self, wall_s: float) -> dict[str, float]:
        return {"cost/wall_s": wall_s, "cost/cpu_hours": wall_s * self.cpus / 3600,
                "cost/gpu_hours": wall_s * self.gpus / 3600}


def resources_held(resources: Mapping[str, float], count: int = 1) -> Held:
    """``count`` bundles of ``resources`` (a Ray resource dict: ``CPU``, ``GPU``, custom)."""
    return Held(count * float(resources.get("CPU", 0.0)), count * float(resources.get("GPU", 0.0)))


def train_held(train) -> Held:
    """A Ray Train run's workers (``cfg.train``), as Ray asks for them: its scaling config's
    public ``total_resources`` (1 CPU per worker by default, 1 GPU and no CPU with
    ``use_gpu``, else ``resources_per_worker``)."""
    import ray.train

    return resources_held(ray.train.ScalingConfig(
        num_workers=train.num_workers, use_gpu=train.use_gpu,
        resources_per_worker=dict(train.resources_per_worker) or None).total_resources)


def log_cost(uri: str | None, run_id: str | None, held: Held, wall_s: float, *,
             accumulate: bool = True) -> dict[str, float]:
    """Add ``wall_s`` x ``held`` to the run's cost (what earlier invocations of a resumed run
    logged stays counted), or with ``accumulate=False`` set it (``wall_s`` is a total already,
    as Tune's ``time_total_s``); the run's new totals. Nothing is logged without a run."""
    added = held.metrics(wall_s)
    if not uri or not run_id:
        return added
    from mlflow.tracking import MlflowClient

    from vspw_ray import tracking

    before = MlflowClient(uri).get_run(run_id).data.metrics if accumulate else {}
    totals = {k: before.get(k, 0.0) + v for k, v in added.items()}
    tracking.log_metrics(uri, run_id, totals, 0)
    return totals


def run_cost(uri: str | None, run_id: str | None) -> dict[str, float]:
    """The ``cost/*`` metrics a run holds (none without a run)."""
    if not uri or not run_id:
        return {}
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if k.startswith("cost/")}


@contextlib.contextmanager
def measured_cost(uri: str | None, run_id: str | None, held: Held) -> Iterator[None]:
    """Log the wall time of the ``with`` body x ``held`` on the run, also when the body fails
    or is stopped (what it held was held all the same)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        log_cost(uri, run_id, held, time.perf_counter() - start)


def sum_child_costs(uri: str, parent_run_id: str, *, by: str = "stage") -> dict[str, float]:
    """The cost of ``parent_run_id``'s child runs, summed per tag ``by`` (``cost/train/gpu_hours``,
    ``cost/train/wall_s``, ...) and, for the resources, in all (``cost/gpu_hours``,
    ``cost/cpu_hours``), logged on the parent and returned."""
    from mlflow.tracking import MlflowClient

    from vspw_ray import tracking

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'",
                                  max_results=5000)
    totals: dict[str, float] = {}
    for child in children:
        group = child.data.tags.get(by, "other")
        for key in COST_KEYS:
            value = child.data.metrics.get(key)
            if value is None:
                continue
            name = key.removeprefix("cost/")
            # stages overlap in time: their wall adds up per stage only, the resources in all
            outs = [f"cost/{group}/{name}"] + ([key] if key != "cost/wall_s" else [])
            for out in outs:
                totals[out] = totals.get(out, 0.0) + value
    if totals:
        tracking.log_metrics(uri, parent_run_id, totals, 0)
    return totals
