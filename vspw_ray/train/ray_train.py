"""`vspw-ray train`: one variant on Ray Train (TorchTrainer, DDP over N workers).

The worker function wires the plain pieces (datasets, ``build_model``, ``train_steps``,
``evaluate_model``) to Ray: it resumes from ``ray.train.get_checkpoint()``, trains iteration by
iteration, validates on folds A and B of val every ``train.val_interval`` iterations (confusion
matrices merged across workers) and reports each validation with a checkpoint. Rank 0 logs to
MLflow and prints one progress line per ``train.log_interval``.

Re-running the same command resumes: the run is named by the variant_id under the storage path,
Ray Train restores its checkpoint bookkeeping from there, and every random draw (data order,
augmentation, dropout) is a function of ``(seed, iteration, rank)``, so an interrupted run ends
with the same weights as an uninterrupted one on the CPU. On each start rank 0 deletes the
half-copied checkpoint folders a killed run or a lost node left, unless Ray Train registered them
(see :mod:`vspw_ray.checkpoints`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vspw_ray import tracking
from vspw_ray.checkpoints import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    read_state,
    remove_incomplete,
    write_checkpoint,
)
from vspw_ray.config import ExperimentConfig, config_from_dict, to_dict
from vspw_ray.data import fold_videos, load_class_table, read_split, split_frames
from vspw_ray.data.datasets import EvalDataset, IterationSampler, TrainDataset, sample_seed
from vspw_ray.data.stats import load_prior
from vspw_ray.metrics import VideoConsistency, summarize
from vspw_ray.models import build_model
from vspw_ray.models.distill import load_model_weights
from vspw_ray.precision import autocast_context, compile_enabled
from vspw_ray.progress import format_duration
from vspw_ray.train.loop import (
    build_optimizer,
    build_scheduler,
    evaluate_model,
    forward_loss,
    train_steps,
)

__all__ = ["train_loop_per_worker", "node_metrics", "validate", "training_state", "save_training_state",
           "write_checkpoint", "load_training_state", "setup_worker", "train_batches", "report",
           "remove_unregistered_checkpoints", "CHECKPOINT_FILE", "METRICS_FILE"]

# Progress goes through logging: Ray Train 2.60 patches print() in workers and, with a wrapped
# stdout, shows each printed line twice; a log record reaches the driver console once.
log = logging.getLogger("vspw_ray.train")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def training_state(*, model, optimizer, scheduler, scaler, iteration: int,
                   cfg: ExperimentConfig, variant: str, metrics: dict | None = None,
                   resumes: list[int] | None = None, **extra) -> dict:
    """What ``checkpoint.pt`` holds: the model (usable alone by infer/ensemble/teacher loading
    and ``train --from``) plus everything a resumed run needs."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": iteration,
        "variant_id": variant,
        "config": to_dict(cfg),
        "metrics": metrics or {},
        "resumes": list(resumes or []),  # iterations this run was resumed at, oldest first
        **extra,
    }


def data_record(config: dict) -> dict:
    """What a checkpoint records of its data: the fingerprint of the data it learnt from and,
    after ``train --from``, that of its starting weights' data (see the driver's
    :func:`~vspw_ray.train.driver.data_tags`)."""
    return {k: config[k] for k in ("data_fingerprint", "init_data_fingerprint") if k in config}


def save_training_state(directory: str | Path, **kwargs) -> str:
    """Write a training checkpoint (see :func:`training_state`) into ``directory``."""
    return write_checkpoint(str(directory), training_state(**kwargs))


def load_training_state(path: str | Path) -> dict:
    """A complete checkpoint's state (folder or ``checkpoint.pt``), on the CPU."""
    return read_state(str(path))


def remove_unregistered_checkpoints() -> list[str]:
    """Delete this Ray Train run's incomplete checkpoint folders that Ray Train has not
    registered: those a killed worker or a lost node left half-copied. Call it from one worker
    when a worker group starts (no upload of this run is in flight then).

    Returns:
        The deleted folders (paths inside the run's storage filesystem).
    """
    import ray.train

    registered = {r.checkpoint.path for r in ray.train.get_all_reported_checkpoints(timeout_s=60)}
    latest = ray.train.get_checkpoint()
    if latest is not None:
        registered.add(latest.path)
    # get_storage() is a DeveloperAPI returning Ray's internal StorageContext; its
    # storage_filesystem and experiment_fs_path (the run folder, without URI scheme) are as of
    # Ray 2.60 (tests/test_train_ray.py::test_ray_storage_context_names_the_run_folder).
    storage = ray.train.get_context().get_storage()
    return remove_incomplete(storage.experiment_fs_path, registered,
                             fs=storage.storage_filesystem)


def _shard_videos(videos: list[str], rank: int, world: int) -> list[str]:
    return videos[rank::world]


def validate(model, cfg: ExperimentConfig, root: str, num_classes: int, class_names,
             device: torch.device, rank: int = 0, world: int = 1
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Official metrics on folds A and B of the val split, and each val video's confusion
    matrix (saved beside the checkpoint for bootstrap intervals over videos); each worker
    scores a share of the videos, and the matrices and VC windows are gathered across workers."""

    videos = read_split(root, cfg.data.val_split)
    autocast, _ = autocast_context(device, cfg.train.amp)
    metrics: dict[str, float] = {}
    confusions: dict[str, np.ndarray] = {}
    for fold in ("A", "B"):
        mine = _shard_videos(fold_videos(videos, fold, cfg.data.fold_seed), rank, world)
        dataset = EvalDataset(split_frames(root, cfg.data.val_split, videos=mine), num_classes,
                              cfg.data)
        scored, vc = evaluate_model(unwrap(model), (dataset[i] for i in range(len(dataset))),
                                    num_classes, device=device, autocast=autocast)
        matrices = {video: cm.matrix for video, cm in scored.items()}
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, (matrices, vc.accs))
            matrices = {v: m for part, _ in gathered for v, m in part.items()}
            vc = VideoConsistency(vc.windows)
            for _, accs in gathered:
                vc.merge(VideoConsistency(vc.windows, accs))
        total = sum(matrices.values(), np.zeros((num_classes, num_classes), np.int64))
        report = summarize(total, class_names, vc)
        for key in ("miou", "fwiou", "pixel_acc", "vc8", "vc16"):
            if report[key] is not None:
                metrics[f"val_{fold}/{key}"] = report[key]
        for name, iou in report["per_class_iou"].items():
            if iou is not None:
                metrics[f"val_{fold}/iou/{name}"] = iou
        confusions.update(matrices)
    return metrics, confusions


def weight_spread(model: torch.nn.Module, world: int) -> float:
    """Largest difference between workers of per-tensor weight checksums (sum and sum of
    squares, float64): 0 when DDP keeps every replica identical, as it must."""
    if world <= 1:
        return 0.0
    params = [p.detach().double() for p in unwrap(model).parameters()]
    sums = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params]).flatten()
    gathered = [torch.zeros_like(sums) for _ in range(world)]
    torch.distributed.all_gather(gathered, sums)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


@dataclass
class Worker:
    """What every Ray Train worker function of this package starts from."""

    cfg: ExperimentConfig
    rank: int
    world: int
    device: torch.device
    table: Any
    model: torch.nn.Module  # DDP-wrapped when world > 1
    autocast: Any
    scaler: Any
    forward: Any = None  # (images, targets) -> (loss, terms): compiled when train.compile says
    fault_after: int | None = None  # raise InjectedFault after this many checkpoints (tests)
    checkpoints: int = 0  # checkpoints reported by this worker group
    preemption_saved: bool = False  # this worker group checkpointed for an announced drain
    pause_after: int | None = None  # wait after this many checkpoints until stopped (tests)


# A testing aid, as Ray's own RAY_testing_* settings: a run that has not resumed raises
# InjectedFault on every worker after its N-th reported checkpoint, so the resume path (the same
# code whether a process died or raised) is tested inside the process, without killing one.
FAULT_ENV = "VSPW_RAY_FAULT_AFTER"
# and one that waits there instead, until the run is stopped or its process killed: a stop
# test then needs no race between the stop's arrival and the end of the training
PAUSE_ENV = "VSPW_RAY_PAUSE_AFTER"


class InjectedFault(RuntimeError):
    """Raised where ``VSPW_RAY_FAULT_AFTER`` asks for it."""


def fault_setting(env: str = FAULT_ENV) -> int | None:
    """``VSPW_RAY_FAULT_AFTER`` (or ``env``) of the driver's environment, for the workers'
    config."""
    value = os.environ.get(env, "").strip()
    if value and not value.isdigit():
        raise ValueError(f"{env} must be a checkpoint count, got '{value}'")
    return int(value) if value else None


def quiet_report_dumps() -> None:
    """Ray Train 2.60 logs every ``ray.train.report`` at INFO with the whole metrics dict
    (``Reporting training result N: TrainingReport(metrics={...})``), a screenful per
    validation on the driver's console, and "Checkpoint successfully created at: ..." per
    checkpoint; our own progress lines say what matters. Their loggers: the first is named by
    the file path of ``ray.train.v2._internal.execution.context``, the second is
    ``ray.train.v2._internal.execution.storage``'s module logger (pinned ray<2.61;
    tests/test_train_ray.py checks both names). Only those two go to WARNING: errors and
    warnings of Ray Train, and everything else, still reach the console."""
    import ray.train.v2._internal.execution.context as ray_context
    import ray.train.v2._internal.execution.storage as ray_storage

    for name in (ray_context.__file__, ray_storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_worker(config: dict) -> Worker:
    """Config, rank, device, class table and the prepared model (identical on every worker)."""
    import ray.train
    import ray.train.torch

    quiet_report_dumps()

    cfg = config_from_dict(config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    table = load_class_table(cfg.data.root)
    prior = None
    la = cfg.loss.logit_adjust
    if la.enabled and la.prior:
        prior = load_prior(la.prior, table.names)
    if device.type == "cuda" and world > 1:  # SyncBatchNorm runs on GPUs only
        cfg = replace(cfg, model=replace(cfg.model, sync_bn=True))
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model = build_model(cfg, table.num_classes, prior)
    if cfg.model.init_checkpoint and not config.get("skip_init_checkpoint"):
        load_model_weights(model, cfg.model.init_checkpoint)
    model = ray.train.torch.prepare_model(model)
    autocast, scaler = autocast_context(device, cfg.train.amp)
    if rank == 0:  # training and SWA alike: a restarted group first clears what a loss left
        for folder in remove_unregistered_checkpoints():
            log.info("[%s] removed half-written checkpoint %s", config["variant_id"], folder)
    forward = forward_loss(model, compile=compile_enabled(cfg.train.compile, device))
    fresh = ray.train.get_checkpoint() is None  # a run that has not resumed
    return Worker(cfg, rank, world, device, table, model, autocast, scaler, forward,
                  config.get("fault_after") if fresh else None,
                  pause_after=config.get("pause_after") if fresh else None)


def train_batches(w: Worker, *, seed: int, start_iter: int, num_iters: int):
    """An iterator over this worker's share of the global batches ``start_iter..num_iters``
    of the data stream ``seed``."""
    frames = split_frames(w.cfg.data.root, w.cfg.data.train_split)
    sampler = IterationSampler(len(frames), w.cfg.train.batch_size, rank=w.rank,
                               world_size=w.world, seed=seed, start_iter=start_iter,
                               num_iters=num_iters)
    loader = torch.utils.data.DataLoader(
        TrainDataset(frames, w.table.num_classes, w.cfg.data),
        batch_size=w.cfg.train.batch_size // w.world, sampler=sampler,
        num_workers=w.cfg.data.loader_workers, drop_last=True,
        pin_memory=w.device.type == "cuda", persistent_workers=False)
    return iter(loader)


def step_seed(w: Worker, iteration: int) -> None:
    """Dropout and drop-path draws depend on (seed, iteration, rank) only: resume-exact."""
    torch.manual_seed(sample_seed(w.cfg.seed, iteration, 1_000_000 + w.rank))


class ProgressLog:
    """Averages loss terms over ``every`` iterations; rank 0 prints one line per window and
    logs the window to MLflow (``train/...`` metrics)."""

    def __init__(self, w: Worker, config: dict, *, every: int, total: int, start: int,
                 unit: str = "it"):
        self.w, self.config, self.every, self.total, self.unit = w, config, every, total, unit
        self.run_start, self.run_start_iter = time.perf_counter(), start
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count, self.images, self.window_start = 0, 0, time.perf_counter()

    def step(self, done: int, terms: dict[str, float], lr: float) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.images += self.w.cfg.train.batch_size
        if done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.window_start
        rate = (done - self.run_start_iter) / max(time.perf_counter() - self.run_start, 1e-9)
        logged = {k: v / self.count for k, v in self.sums.items()}
        logged.update(lr=lr, images_per_s=self.images / elapsed)
        if self.w.rank == 0:
            eta = format_duration((self.total - done) / rate) if rate > 0 else "?"
            log.info("[%s] %s %d/%d  loss %.4f  lr %.2e  %.2f it/s  ETA %s",
                     self.config["variant_id"], self.unit, done,
                     self.total, logged["loss"], lr, rate, eta)
            if self.config.get("run_id"):
                tracking.log_metrics(self.config["tracking_uri"], self.config["run_id"],
                                     {f"train/{k}": v for k, v in logged.items()}, done)
        self._reset()


def preemption_announced(w: Worker, config: dict, done: int) -> bool:
    """Whether Ray has announced the drain of a node of this worker group (a spot reclaim) that
    it has not yet checkpointed for. Asked every ``train.log_interval`` iterations: it is a
    collective (every worker asks at the same iterations and gets rank 0's answer) and Ray's
    watcher polls the drains every few seconds anyway."""
    import ray.train

    if not config.get("preemption_checkpoints") or w.preemption_saved or \
            done % w.cfg.train.log_interval:
        return False
    info = ray.train.get_preemption_info()
    if info is None:
        return False
    w.preemption_saved = True
    if w.rank == 0:
        log.warning("[%s] node(s) %s to be preempted (ranks %s): checkpoint at iteration %d",
                    config["variant_id"], ", ".join(n[:12] for n in info.preempted_node_ids),
                    info.preempted_ranks, done)
    return True


def preemption_metrics(config: dict, done: int, **extra) -> dict:
    """What a preemption checkpoint reports: no validation ran, so the score Ray Train ranks
    checkpoints by is NaN (ranked below every validated one; this package's own lookups read
    the checkpoint's metrics, which hold none)."""
    score = config.get("checkpoint_score")
    return {**({score: float("nan")} if score else {}), "iteration": done,
            "preemption_checkpoint": 1.0, **extra}


def report(w: Worker, metrics: dict, state: dict | None,
           confusions: dict[str, np.ndarray] | None = None) -> None:
    """``ray.train.report`` (collective: every worker calls it); rank 0 attaches ``state``
    written as ``checkpoint.pt``, with the validation's per-video ``confusions``."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if w.rank == 0 and state is not None:
            write_checkpoint(d, state, val_confusions=confusions)
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)
    w.checkpoints += 1  # every report of this package carries rank 0's checkpoint
    if w.fault_after is not None and w.checkpoints == w.fault_after:
        raise InjectedFault(f"{FAULT_ENV}={w.fault_after}: a fault injected after checkpoint "
                            f"{w.checkpoints}")
    while w.pause_after is not None and w.checkpoints == w.pause_after:
        time.sleep(1.0)  # PAUSE_ENV: until the run is stopped


def node_metrics(loop, interval_s: float, config: dict) -> None:
    """``loop(config)`` with this node's system metrics logged to the run as
    ``system/node-<Ray node id>/<name>`` (``tracking.system_metrics``): by the worker of local
    rank 0, one per node."""
    import ray
    import ray.train

    if ray.train.get_context().get_local_rank() != 0:
        return loop(config)
    node = f"node-{ray.get_runtime_context().get_node_id()[:8]}"
    with tracking.system_metrics(config["tracking_uri"], config["run_id"], node, interval_s):
        return loop(config)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker. ``config``: ``experiment`` (resolved config dict), ``variant_id``,
    ``tracking_uri``, ``run_id`` (MLflow run rank 0 logs to)."""
    import ray.train

    started = time.perf_counter()
    checkpoint = ray.train.get_checkpoint()
    w = setup_worker({**config, "skip_init_checkpoint": checkpoint is not None})
    cfg, model = w.cfg, w.model
    optimizer = build_optimizer(unwrap(model), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)

    start, resumes = 0, []
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_training_state(d)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if w.scaler is not None and state.get("scaler"):
            w.scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        resumes = list(state.get("resumes", [])) + [start]
        if w.rank == 0:
            log.info("[%s] resuming at iteration %d/%d", config["variant_id"], start, cfg.train.iters)

    def state_at(done: int, metrics: dict) -> dict | None:  # rank 0's checkpoint.pt
        return None if w.rank else training_state(
            model=model, optimizer=optimizer, scheduler=scheduler, scaler=w.scaler,
            iteration=done, cfg=cfg, variant=config["variant_id"], metrics=metrics,
            resumes=resumes, **data_record(config))

    total = cfg.train.iters
    batches = train_batches(w, seed=cfg.seed, start_iter=start, num_iters=total)
    progress = ProgressLog(w, config, every=cfg.train.log_interval, total=total, start=start)
    for it in range(start, total):
        step_seed(w, it)
        terms = train_steps(model, optimizer, scheduler, batches, 1, device=w.device,
                            autocast=w.autocast, scaler=w.scaler, grad_clip=cfg.train.grad_clip,
                            forward=w.forward)
        done = it + 1
        progress.step(done, terms, scheduler.get_last_lr()[0])
        validates = done % cfg.train.val_interval == 0 or done == total
        if preemption_announced(w, config, done) and not validates:
            report(w, preemption_metrics(config, done), state_at(done, {}))
        if validates:
            metrics, confusions = validate(model, cfg, cfg.data.root, w.table.num_classes,
                                           w.table.names, w.device, w.rank, w.world)
            metrics["iteration"] = done
            metrics["ddp/weight_spread"] = weight_spread(model, w.world)
            metrics["time/worker_s"] = time.perf_counter() - started  # since this worker began
            if w.rank == 0 and config.get("run_id"):
                tracking.log_metrics(config["tracking_uri"], config["run_id"],
                                     {k: v for k, v in metrics.items() if k != "iteration"}, done)
            report(w, metrics, state_at(done, metrics), confusions)
