"""MLflow, and only here. The tracking URI defaults to a SQLite file in the storage folder
(MLflow 3.17's file store refuses to run); on a cluster it must be a tracking server."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vspw_ray.storage import is_uri

__all__ = ["resolve_tracking_uri", "flatten", "open_run", "log_metrics", "log_new_params",
           "log_artifact", "find_run", "finish_run", "system_metrics", "system_metrics_interval",
           "node_system_metrics",
           "PARENT_TAG"]

log = logging.getLogger(__name__)
PARENT_TAG = "mlflow.parentRunId"  # shows a run as the child of another in the MLflow UI
SAMPLING_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"  # MLflow's own setting, in seconds
SAMPLING_S = 10.0  # MLflow's default


def resolve_tracking_uri(uri: str | None, storage_path: str) -> str:
    if uri:
        return uri
    if is_uri(storage_path):
        raise ValueError(f"config key 'tracking.uri': storage.path is {storage_path}, where no "
                         f"SQLite file can live; set tracking.uri=http://HOST:5000 (an MLflow "
                         f"server) or sqlite:////abs/local/path.db")
    local = Path(storage_path).expanduser().resolve()
    local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local / 'mlflow.db'}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "6e-05", ...}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def _experiment_id(mlflow, name: str, storage_path: str) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = f"{storage_path.rstrip('/')}/mlartifacts" if is_uri(storage_path) \
        else str(Path(storage_path).expanduser().resolve() / "mlartifacts")
    return mlflow.create_experiment(name, artifact_location=artifacts)


def find_run(uri: str, experiment: str, tags: Mapping[str, str], *,
             unfinished: bool = True) -> str | None:
    """The newest run of ``experiment`` with these tags that is unfinished (to resume; any run
    with ``unfinished=False``), or None."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = mlflow.search_runs([exp.experiment_id], filter_string=query, output_format="list",
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        if not unfinished or run.info.status != "FINISHED":
            return run.info.run_id
    return None


@contextlib.contextmanager
def open_run(uri: str, experiment: str, storage_path: str, *, run_id: str | None = None,
             run_name: str | None = None, tags: Mapping[str, str] | None = None,
             params: Mapping[str, str] | None = None, end_status: str = "FINISHED",
             system: bool = False):
    """Start (or resume, with ``run_id``) an MLflow run; yields its id. With ``system`` this
    process's node's system metrics are logged to it while it is open (:func:`system_metrics`)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    mlflow.set_tracking_uri(uri)
    exp_id = _experiment_id(mlflow, experiment, storage_path)
    # nested inside a run this thread holds open (a stage run inside the pipeline's): MLflow's
    # fluent API keeps one stack of active runs per thread
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                           run_name=run_name, tags=dict(tags or {}),
                           nested=mlflow.active_run() is not None)
    try:
        if params and not run_id:
            items = list(params.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i : i + 100]))
        with system_metrics(uri, run.info.run_id) if system else contextlib.nullcontext():
            yield run.info.run_id
    except BaseException:
        mlflow.end_run("KILLED")
        raise
    else:
        mlflow.end_run(end_status)


def system_metrics_interval() -> float:
    """Seconds between system-metric samples: MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
    as this process sees it (the driver passes it on to Ray's workers), else MLflow's 10."""
    return float(os.environ.get(SAMPLING_ENV) or SAMPLING_S)


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str, node_id: str | None = None,
                   interval_s: float | None = None):
    """MLflow's system metrics of this machine (CPU, memory, disk, network; NVIDIA GPUs where
    ``nvidia-ml-py`` is installed) logged to ``run_id`` while the block runs: ``system/<name>``,
    or ``system/<node_id>/<name>`` from the nodes of a multi-node run. One sample every
    ``interval_s`` (:func:`system_metrics_interval`) and a last one as the block ends, so a run
    shorter than the interval has its figures too."""
    stop = _start_monitor(uri, run_id, node_id, interval_s)
    try:
        yield
    finally:
        stop()


def _start_monitor(uri: str, run_id: str, node_id: str | None, interval_s: float | None):
    """MLflow's monitor started; returns the function that stops it after a last sample."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s or system_metrics_interval(),
                                   resume_logging=True, node_id=node_id, tracking_uri=uri)
    monitor.start()

    def stop() -> None:
        monitor.finish()
        try:
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001 -- as MLflow's monitor: metrics never fail a run
            log.warning("the last system-metrics sample of run %s was not logged: %s", run_id, err)

    return stop


def node_system_metrics(uri: str, run_id: str, node_id: str, interval_s: float | None = None):
    """System metrics of this node for ``run_id`` from one process per node: the first process
    of the node that asks (a lock on a file in the node's temporary folder, released when that
    process ends) starts MLflow's monitor and gets the function that stops it; every other
    process gets None. For processes without a rank, such as Ray Data's actors."""
    import fcntl
    import tempfile

    lock = open(Path(tempfile.gettempdir()) / f"vspw_ray-system-metrics-{run_id}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    stop_monitor = _start_monitor(uri, run_id, node_id, interval_s)

    def stop() -> None:
        stop_monitor()
        lock.close()

    return stop


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    MlflowClient(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, step)
                                                 for k, v in metrics.items() if v is not None])


def log_new_params(uri: str, run_id: str, params: Mapping[str, str]) -> None:
    """Log the params a run does not hold yet (MLflow refuses to change a logged param; a
    resumed run keeps the values it was first given)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    held = client.get_run(run_id).data.params
    new = {k: str(v) for k, v in params.items() if k not in held}
    if new:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, v) for k, v in new.items()])


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_artifact(run_id, str(path), artifact_path)


def finish_run(uri: str, run_id: str, status: str, tags: Mapping[str, str] | None = None) -> None:
    """Set a run's final status (FINISHED, KILLED, FAILED) and tags from outside the run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status)
