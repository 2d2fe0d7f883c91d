"""How every stage opens: resolve the Ray address, check the cluster settings, make the config's
paths absolute, resolve storage and tracking, connect to Ray, and find or open the stage's
MLflow run. ``train``, ``swa``, ``tune``, ``infer``, ``ensemble`` and ``pipeline`` all start
with :func:`open_stage`.

* No address (neither ``--address`` nor ``RAY_ADDRESS``): a fresh local Ray instance
  (``address="local"``), never an instance some earlier process left behind: a killed run
  leaves Ray's ``ray_current_cluster`` file, which ``ray.init()`` would otherwise try to join.
* An address: the cluster is joined; one that does not answer is a one-line error naming it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

from vspw_ray.config import (
    ExperimentConfig,
    check_trainable,
    teacher_variant,
    to_dict,
    variant_fingerprint,
)
from vspw_ray.errors import UserError
from vspw_ray.layout import RunLayout
from vspw_ray.storage import check_cluster_settings, is_uri, resolve_storage

__all__ = ["Prepared", "Stage", "prepare_stage", "stage_run", "open_stage", "connect_ray",
           "resolve_address", "prepare_config", "git_commit", "note_id_scheme", "ID_SCHEME_FILE",
           "DASHBOARD_ENV", "LOCAL", "RayConnectionError", "restored_environ"]

log = logging.getLogger("vspw_ray")

LOCAL = "local"  # Ray's own name for "start a new local instance"
DASHBOARD_ENV = "VSPW_RAY_DASHBOARD"  # "0": start a local instance without the dashboard
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # Ray's State API / job client address override


class RayConnectionError(UserError):
    """The Ray cluster named by ``--address`` / ``RAY_ADDRESS`` cannot be joined."""


# Ray Train settings of a local instance (environment variables of Ray 2.60's
# ray.train.v2._internal.constants; tests/test_cli.py checks that Ray still reads them).
LOCAL_RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@contextlib.contextmanager
def restored_environ(*keys: str) -> Iterator[None]:
    """Inside the block ``keys`` of ``os.environ`` may be set or removed; after it each is as it
    was before (removed again if it was not set)."""
    before = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def use_local_ray_train_settings() -> None:
    """Put :data:`LOCAL_RAY_TRAIN_ENV` into this process's environment (Ray's processes inherit
    it) where the user has not set a value; call before a local ``ray.init``."""
    for key, value in LOCAL_RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)


def pin_local_dashboard() -> int:
    """A free port for a local instance's dashboard, named in ``RAY_API_SERVER_ADDRESS`` of
    this process's environment (which Ray's processes inherit); call before a local
    ``ray.init(dashboard_port=...)``. Ray's State API client otherwise finds "the" local
    instance by looking for running GCS processes: with two local instances on one machine (a
    sweep and an ensemble in two terminals) Ray Train's placement-group cleaner would ask the
    other instance about its controller, find none, and remove a live run's resources."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    return port


def resolve_address(address: str | None) -> str | None:
    """``--address``, else ``RAY_ADDRESS``, else None (a local instance)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == LOCAL else address


RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


def quiet_ray_libraries() -> None:
    """Ray's libraries as this package's console wants them, through their public switches,
    where the user has not set them: Ray Data's INFO lines (a dataset's start, plan and end)
    to its log file only (:data:`RAY_DATA_LOGGING`, read when ``ray.data`` is imported and
    when a dataset starts); Tune's automatic loggers off (no TensorBoard files, so no
    TensorBoard hint: MLflow tracks every run; the sweep keeps Tune's CSV and JSON results
    through its own callbacks). Ray's processes started after this inherit both."""
    os.environ.setdefault(RAY_DATA_LOGGING_ENV, str(RAY_DATA_LOGGING))
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def tune_result_loggers() -> list:
    """Tune's CSV and JSON result files for a Tuner's ``RunConfig(callbacks=...)``: with its
    automatic loggers off (:func:`quiet_ray_libraries`) they are what Tune's own result
    reading (``ExperimentAnalysis``) needs; TensorBoard's are left out."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


_STOP: list = []  # the SIGTERM handler a command installed, kept across ray.init
STOPPED = "stopped; run the same command again to resume"
STOP_CLEANUP_S = 20.0  # a stop's clean-up at most (within a job's stop wait), then exit
_DEADLINE: list = []


def _stop_deadline() -> None:
    """From the first stop on, the process ends within :data:`STOP_CLEANUP_S` whatever its
    clean-up waits for (an MLflow server that does not answer, a Ray call): the stop line and
    every thread's stack are printed, then it exits 130. What is written stays resumable."""
    if _DEADLINE:
        return

    def expire() -> None:
        print(f"{STOPPED} (the clean-up took over {STOP_CLEANUP_S:.0f} s and was cut short; "
              f"where each thread waited follows)", file=sys.stderr, flush=True)
        if sys.__stderr__ is not None:
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        os._exit(130)

    timer = threading.Timer(STOP_CLEANUP_S, expire)
    timer.daemon = True
    timer.start()
    _DEADLINE.append(timer)


def _interrupt(signum, frame) -> None:
    """Ctrl-C: Python's KeyboardInterrupt, with the clean-up's deadline started."""
    _stop_deadline()
    raise KeyboardInterrupt


def _forward_to_sigint(signum, frame) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler) or handler is signal.default_int_handler:  # stop all the same
        _interrupt(signum, frame)
    handler(signal.SIGINT, frame)


def stop_on_sigterm() -> None:
    """SIGTERM (``ray job stop``, ``kill``, a Kubernetes pod's end) takes Ctrl-C's path: the
    SIGINT handler in place runs (Tune's graceful stop while a sweep runs, else Python's
    KeyboardInterrupt), so every command stops the same way whichever signal it gets. The
    handler is called, not the signal re-raised: Ray's job supervisor starts entrypoints with
    SIGINT blocked unless ``RAY_JOB_STOP_SIGNAL=SIGINT``. ``ray.init`` puts Ray's own handler
    in place (it logs the signal and aborts): :func:`connect_ray` puts this one back. From the
    first stop on, the clean-up has :data:`STOP_CLEANUP_S` before the process exits anyway."""
    signal.signal(signal.SIGTERM, _forward_to_sigint)
    current = signal.getsignal(signal.SIGINT)
    # a job stopped by SIGINT (RAY_JOB_STOP_SIGNAL) must act on it even when it inherited SIGINT
    # ignored: a shell without job control ignores it in background commands (a cluster started
    # from a script with `&`), Ray's supervisor unblocks it but never un-ignores it
    asked = os.environ.get("RAY_JOB_STOP_SIGNAL") == "SIGINT"
    if current is signal.default_int_handler or (current == signal.SIG_IGN and asked):
        signal.signal(signal.SIGINT, _interrupt)
    _STOP[:] = [_forward_to_sigint]


def _keep_stop_handler() -> None:
    if _STOP and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _STOP[0])


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start a local Ray instance
    with enough logical CPUs for a driver plus the workers on a small machine.

    The local instance runs the dashboard process, which serves Ray's State API: Ray Train's
    helpers poll it, and ``ray list actors`` works against a running job
    (``VSPW_RAY_DASHBOARD=0`` leaves it out, which saves ~1 s of start-up and makes Ray Train
    warn that the State API is unavailable). Two of Ray Train's settings differ there
    (:data:`LOCAL_RAY_TRAIN_ENV`; a value the user set is kept): the preemption watcher is off,
    since a single local node is never drained, and the controller checks its workers every
    0.5 s instead of 2 s, so a stage's end is seen at once (a short stage spent ~4 s waiting for
    the poll). A cluster keeps Ray's settings."""
    import ray

    if ray.is_initialized():
        return
    address = resolve_address(address)
    if address:
        _probe(address)
        quiet_ray_libraries()
        try:
            ray.init(address=address, log_to_driver=True)
            _keep_stop_handler()
        except (ConnectionError, TimeoutError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RayConnectionError(
                f"cannot join the Ray cluster at {address} (--address / RAY_ADDRESS): {first}; "
                f"check that the head node is running (`ray status --address {address}`), or "
                f"leave the address out to run on a local Ray instance") from None
        return
    use_local_ray_train_settings()
    quiet_ray_libraries()
    dashboard = os.environ.get(DASHBOARD_ENV, "1") not in ("", "0")
    pinned = {"dashboard_port": pin_local_dashboard()} if dashboard else {}
    ray.init(address=LOCAL, num_cpus=num_cpus or max(4, os.cpu_count() or 1),
             include_dashboard=dashboard, log_to_driver=True, **pinned)
    _keep_stop_handler()
    print("started a local Ray instance (no --address or RAY_ADDRESS given; a cluster is joined "
          "only when named)", file=sys.stderr, flush=True)


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on an address nothing listens at: ``ray.init`` retries a dead GCS for
    minutes. ``auto`` (Ray's own lookup) is left to Ray."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayConnectionError(f"Ray address '{address}' is not HOST:PORT (e.g. 10.0.0.5:6379 "
                                 f"or ray://10.0.0.5:10001); check --address / RAY_ADDRESS")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise RayConnectionError(
            f"cannot join the Ray cluster at {address} (--address / RAY_ADDRESS): nothing "
            f"answers there ({err.strerror or err}); check that the head node is running "
            f"(`ray status --address {hostport}`), or leave the address out to run on a local "
            f"Ray instance") from None


def prepare_config(cfg: ExperimentConfig, *, trainable: bool = True) -> ExperimentConfig:
    """Check the cross-section rules (``trainable``) and make the user's relative paths
    absolute (workers run in other folders). URIs stay as they are."""
    if trainable:
        check_trainable(cfg)

    def absolute(path: str | None) -> str | None:
        return path if path is None or is_uri(path) else str(Path(path).expanduser().resolve())

    la, distill = cfg.loss.logit_adjust, cfg.loss.distill
    return replace(
        cfg,
        data=replace(cfg.data, root=absolute(cfg.data.root)),
        model=replace(cfg.model, pretrained=absolute(cfg.model.pretrained),
                      init_checkpoint=absolute(cfg.model.init_checkpoint)),
        loss=replace(cfg.loss, logit_adjust=replace(la, prior=absolute(la.prior)),
                     distill=replace(distill, teacher=(
                         distill.teacher if teacher_variant(distill.teacher)
                         else absolute(distill.teacher)),
                         teacher_checkpoint=absolute(distill.teacher_checkpoint))),
    )


ID_SCHEME_FILE = "ids.json"  # <storage>/ids.json: which ids the storage's results are under
ID_SCHEME = 2  # 2: every id covers the data's fingerprint (issue 28); 1: ids before that
_OLDER_OUTPUTS = ("train", "swa", "scores", "ensembles", "pipeline")


def note_id_scheme(layout: RunLayout) -> bool:
    """Mark the storage with :data:`ID_SCHEME`; for storage written before ids covered the
    data, print once that its results stay readable under their old ids and that new runs use
    new ones (nothing is re-keyed: an old id never names a result of the new scheme). Returns
    whether the notice was printed."""
    import json

    import pyarrow.fs

    from vspw_ray.storage import filesystem, write_atomic

    fs, root = filesystem(layout.storage)
    if fs.get_file_info(f"{root}/{ID_SCHEME_FILE}").type == pyarrow.fs.FileType.File:
        return False
    older = [name for name in _OLDER_OUTPUTS
             if fs.get_file_info(f"{root}/{name}").type == pyarrow.fs.FileType.Directory]
    if older:
        print(f"note: {layout.storage} holds results written before ids covered the data's "
              f"fingerprint ({', '.join(older)}); they stay readable under their old ids, and "
              f"new runs use new ids, so nothing of theirs is reused (README: What an id means)",
              file=sys.stderr, flush=True)
    write_atomic(fs, f"{root}/{ID_SCHEME_FILE}", json.dumps(
        {"scheme": ID_SCHEME, "older_outputs": older}).encode())
    return bool(older)


def git_commit() -> str:
    """The project's git commit, or ``unknown`` outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class Prepared:
    """A stage's settings made concrete, before any Ray or MLflow: what :func:`prepare_stage`
    returns."""

    cfg: ExperimentConfig  # checked, paths absolute
    layout: RunLayout  # where every output lives
    address: str | None  # the cluster, or None for the local instance
    tracking_uri: str | None  # None: nothing is tracked
    experiment: str  # the MLflow experiment

    @property
    def storage(self) -> str:
        return self.layout.storage


@dataclass(frozen=True)
class Stage(Prepared):
    """An opened stage: its prepared settings and its MLflow run."""

    run_id: str | None = None  # the stage's MLflow run (None with --no-track)


def _tracking_uri(cfg: ExperimentConfig, storage: str, track: bool) -> str | None:
    from vspw_ray import tracking

    if not track and not cfg.tracking.uri and is_uri(storage):
        return None  # nothing tracked, and no SQLite file can live beside a URI
    return tracking.resolve_tracking_uri(cfg.tracking.uri, storage)


def prepare_stage(cfg: ExperimentConfig, *, address: str | None = None, track: bool = True,
                  trainable: bool = True, experiment: str | None = None) -> Prepared:
    """The pure part of opening a stage (no Ray, no MLflow): the address resolved, cluster
    settings checked, paths made absolute (``trainable``: the training rules checked too),
    storage resolved and marked with the id scheme, the tracking URI and experiment named."""
    address = resolve_address(address)
    check_cluster_settings(cfg, address, track=track)
    cfg = prepare_config(cfg, trainable=trainable)
    layout = RunLayout(resolve_storage(cfg.storage.path))
    note_id_scheme(layout)
    return Prepared(cfg, layout, address, _tracking_uri(cfg, layout.storage, track),
                    experiment or cfg.tracking.experiment or cfg.name)


@contextlib.contextmanager
def stage_run(prep: Prepared, stage: str, tags: Mapping[str, str], *, track: bool = True,
              connect: bool = True, run_name: str | None = None,
              extra_tags: Mapping[str, str] | None = None,
              params: Mapping[str, str] | None = None,
              parent: str | None = None) -> Iterator[Stage]:
    """Ray connected (``connect``) and the stage's MLflow run open; yields a :class:`Stage`.

    ``tags`` identify the run (``stage`` is added): an unfinished run with the same tags is
    resumed, else a new one is opened (named ``run_name``, with ``extra_tags`` and ``params``,
    default the resolved config; a child of the run ``parent`` when given) and ended FINISHED,
    or KILLED on an error. With ``track=False`` no run is opened and ``run_id`` is None."""
    from vspw_ray import tracking

    cfg, uri, experiment = prep.cfg, prep.tracking_uri, prep.experiment
    key = {**tags, "stage": stage}
    track = track and uri is not None
    with ThreadPoolExecutor(1) as pool:  # a new SQLite store makes its tables while Ray starts
        pending = pool.submit(tracking.find_run, uri, experiment, key) if track else None
        if connect:
            connect_ray(prep.address)
        run_id = pending.result() if pending else None
    opened = {f.name: getattr(prep, f.name) for f in fields(Prepared)}
    if not track:
        yield Stage(**opened, run_id=None)
        return
    tags = {**key, "data_fingerprint": variant_fingerprint(cfg), **(extra_tags or {}),
            "git_commit": git_commit()}
    if parent:  # the stage's run is a child of this one (the pipeline's)
        tags[tracking.PARENT_TAG] = parent
    with tracking.open_run(uri, experiment, prep.storage, run_id=run_id, run_name=run_name,
                           tags=tags,
                           params=tracking.flatten(to_dict(cfg)) if params is None else params,
                           system=cfg.tracking.system_metrics) as rid:
        yield Stage(**opened, run_id=rid)


@contextlib.contextmanager
def open_stage(cfg: ExperimentConfig, stage: str, tags: Mapping[str, str], *,
               address: str | None = None, track: bool = True, connect: bool = True,
               trainable: bool = True, run_name: str | None = None,
               extra_tags: Mapping[str, str] | None = None,
               params: Mapping[str, str] | None = None,
               experiment: str | None = None, parent: str | None = None) -> Iterator[Stage]:
    """:func:`prepare_stage` then :func:`stage_run`: the common opening of a stage that
    needs nothing between the two."""
    prep = prepare_stage(cfg, address=address, track=track, trainable=trainable,
                         experiment=experiment)
    with stage_run(prep, stage, tags, track=track, connect=connect, run_name=run_name,
                   extra_tags=extra_tags, params=params, parent=parent) as opened:
        yield opened
