"""Can the cluster ever run the requested workers, and are they free now?

Ray Train 2.60 retries a worker group that cannot get its resources forever (a 60 s start
timeout, then again). Here a request that no node -- alive, or an autoscaling node type of
``cluster.yaml`` -- could ever satisfy fails at once, naming the resource; a request that only
has to wait prints that it waits and gives up after ``train.resource_wait_s``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import yaml

from vspw_ray.config import ExperimentConfig

__all__ = ["worker_request", "node_type_resources", "check_feasible", "wait_for_resources",
           "CLUSTER_YAML_ENV"]

CLUSTER_YAML_ENV = "VSPW_RAY_CLUSTER_YAML"


def worker_request(cfg: ExperimentConfig) -> dict[str, float]:
    request = {"CPU": 1.0}
    if cfg.train.use_gpu:
        request["GPU"] = 1.0
    request.update({k: float(v) for k, v in cfg.train.resources_per_worker.items()})
    return request


def node_type_resources(path: str | Path | None) -> list[dict[str, float]]:
    """Resources of each ``available_node_types`` entry of a Ray cluster launcher YAML."""
    if not path or not Path(path).is_file():
        return []
    spec = yaml.safe_load(Path(path).read_text()) or {}
    return [dict(t.get("resources", {})) for t in spec.get("available_node_types", {}).values()]


def _fits(node: dict[str, float], request: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in request.items())


def check_feasible(cfg: ExperimentConfig, *, cluster_yaml: str | Path | None = None) -> None:
    import ray

    request = worker_request(cfg)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    nodes += node_type_resources(cluster_yaml or os.environ.get(CLUSTER_YAML_ENV))
    if any(_fits(n, request) for n in nodes):
        return
    short = [k for k, v in request.items() if not any(n.get(k, 0.0) >= v for n in nodes)] \
        or sorted(request)
    have = ", ".join(f"{k}={max((n.get(k, 0.0) for n in nodes), default=0):g}" for k in short)
    raise ValueError(
        f"no node of this cluster (nor a node type of its cluster.yaml) can run one training "
        f"worker needing {request}: short of {short} (largest node has {have}). "
        f"Change train.use_gpu / train.resources_per_worker, or add a node type that has them.")


def wait_for_resources(cfg: ExperimentConfig, *, poll_s: float = 2.0, stream=None) -> None:
    """Block until the cluster has ``train.num_workers`` workers' worth of free resources, or
    raise TimeoutError after ``train.resource_wait_s``."""
    import ray

    stream = stream or sys.stderr
    request, n = worker_request(cfg), cfg.train.num_workers
    need = {k: v * n for k, v in request.items()}
    deadline = time.monotonic() + cfg.train.resource_wait_s
    said = 0.0
    while True:
        free = ray.available_resources()
        if all(free.get(k, 0.0) >= v for k, v in need.items()):
            return
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(
                f"waited {cfg.train.resource_wait_s:g} s for {n} workers x {request} (free now: "
                f"{ {k: free.get(k, 0.0) for k in need} }); raise train.resource_wait_s, lower "
                f"train.num_workers, or add nodes")
        if now - said >= 10:
            print(f"waiting for resources: {n} workers x {request}, free "
                  f"{ {k: free.get(k, 0.0) for k in need} } (gives up in "
                  f"{deadline - now:.0f} s, train.resource_wait_s)", file=stream, flush=True)
            said = now
        time.sleep(poll_s)
