"""`vspw-ray train`: one variant on Ray Train (TorchTrainer, DDP over N workers).

The worker function wires the plain pieces (datasets, ``build_model``, ``train_steps``,
``evaluate_model``) to Ray: it resumes from ``ray.train.get_checkpoint()``, trains iteration by
iteration, validates on folds A and B of val every ``train.val_interval`` iterations (confusion
matrices merged across workers) and reports each validation with a checkpoint. Rank 0 logs to
MLflow and prints one progress line per ``train.log_interval``.

Re-running the same command resumes: the run is named by the variant_id under the storage path,
Ray Train restores its checkpoint bookkeeping from there, and every random draw (data order,
augmentation, dropout) is a function of ``(seed, iteration, rank)``, so an interrupted run ends
with the same weights as an uninterrupted one on the CPU.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vspw_ray.config import ExperimentConfig, config_from_dict, to_dict
from vspw_ray.data import fold_videos, load_class_table, read_split, split_frames
from vspw_ray.data.datasets import EvalDataset, IterationSampler, TrainDataset, sample_seed
from vspw_ray.metrics import ConfusionMatrix, VideoConsistency, summarize
from vspw_ray.progress import format_duration

__all__ = ["train_loop_per_worker", "validate", "save_training_state", "load_training_state",
           "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "checkpoint.pt"
# Progress goes through logging: Ray Train 2.60 patches print() in workers and, with a wrapped
# stdout, shows each printed line twice; a log record reaches the driver console once.
log = logging.getLogger("vspw_ray.train")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_training_state(directory: str | Path, *, model, optimizer, scheduler, scaler,
                        iteration: int, cfg: ExperimentConfig, variant: str,
                        metrics: dict | None = None, resumes: list[int] | None = None) -> Path:
    """Write ``checkpoint.pt``: the model (usable alone by infer/ensemble/teacher loading) plus
    everything a resumed run needs."""
    path = Path(directory) / CHECKPOINT_FILE
    torch.save({
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "iteration": iteration,
        "variant_id": variant,
        "config": to_dict(cfg),
        "metrics": metrics or {},
        "resumes": list(resumes or []),  # iterations this run was resumed at, oldest first
    }, path)
    return path


def load_training_state(path: str | Path) -> dict:
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def _shard_videos(videos: list[str], rank: int, world: int) -> list[str]:
    return videos[rank::world]


def validate(model, cfg: ExperimentConfig, root: str, num_classes: int, class_names,
             device: torch.device, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Official metrics on folds A and B of the val split; each worker scores a share of the
    videos and the confusion matrices and VC windows are merged across workers."""
    from vspw_ray.train.loop import autocast_context, evaluate_model

    videos = read_split(root, cfg.data.val_split)
    autocast, _ = autocast_context(device, cfg.train.amp)
    metrics: dict[str, float] = {}
    for fold in ("A", "B"):
        mine = _shard_videos(fold_videos(videos, fold, cfg.data.fold_seed), rank, world)
        dataset = EvalDataset(split_frames(root, cfg.data.val_split, videos=mine), num_classes,
                              cfg.data)
        cm, vc = evaluate_model(_unwrap(model), (dataset[i] for i in range(len(dataset))),
                                num_classes, device=device, autocast=autocast)
        if world > 1:
            matrix = torch.from_numpy(cm.matrix).to(device)
            torch.distributed.all_reduce(matrix)
            cm = ConfusionMatrix(num_classes, matrix.cpu().numpy())
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, vc.accs)
            vc = VideoConsistency(vc.windows)
            for accs in gathered:
                vc.merge(VideoConsistency(vc.windows, accs))
        report = summarize(cm.matrix, class_names, vc)
        for key in ("miou", "fwiou", "pixel_acc", "vc8", "vc16"):
            if report[key] is not None:
                metrics[f"val_{fold}/{key}"] = report[key]
        for name, iou in report["per_class_iou"].items():
            if iou is not None:
                metrics[f"val_{fold}/iou/{name}"] = iou
    return metrics


def weight_spread(model: torch.nn.Module, world: int) -> float:
    """Largest difference between workers of per-tensor weight checksums (sum and sum of
    squares, float64): 0 when DDP keeps every replica identical, as it must."""
    if world <= 1:
        return 0.0
    params = [p.detach().double() for p in _unwrap(model).parameters()]
    sums = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params]).flatten()
    gathered = [torch.zeros_like(sums) for _ in range(world)]
    torch.distributed.all_gather(gathered, sums)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker. ``config``: ``experiment`` (resolved config dict), ``variant_id``,
    ``tracking_uri``, ``run_id`` (MLflow run rank 0 logs to)."""
    import ray.train
    import ray.train.torch

    from vspw_ray import tracking
    from vspw_ray.data.stats import load_prior
    from vspw_ray.models import build_model
    from vspw_ray.train.loop import autocast_context, build_optimizer, build_scheduler, train_steps

    cfg = config_from_dict(config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    root = cfg.data.root
    table = load_class_table(root)
    prior = None
    if cfg.loss.logit_adjust.enabled:
        prior = load_prior(cfg.loss.logit_adjust.prior, table.names) \
            if cfg.loss.logit_adjust.prior else None

    if device.type == "cuda" and world > 1:  # SyncBatchNorm runs on GPUs only
        cfg = replace(cfg, model=replace(cfg.model, sync_bn=True))
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model = build_model(cfg, table.num_classes, prior)
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(_unwrap(model), cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    autocast, scaler = autocast_context(device, cfg.train.amp)

    start, resumes = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_training_state(Path(d) / CHECKPOINT_FILE)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        resumes = list(state.get("resumes", [])) + [start]
        if rank == 0:
            log.info("[%s] resuming at iteration %d/%d", config["variant_id"], start, cfg.train.iters)

    frames = split_frames(root, cfg.data.train_split)
    sampler = IterationSampler(len(frames), cfg.train.batch_size, rank=rank, world_size=world,
                               seed=cfg.seed, start_iter=start, num_iters=cfg.train.iters)
    loader = torch.utils.data.DataLoader(
        TrainDataset(frames, table.num_classes, cfg.data), batch_size=cfg.train.batch_size // world,
        sampler=sampler, num_workers=cfg.data.loader_workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=False)
    batches = iter(loader)

    log_every, val_every, total = cfg.train.log_interval, cfg.train.val_interval, cfg.train.iters
    window_start, window_images = time.perf_counter(), 0
    run_start, run_start_iter = time.perf_counter(), start
    sums: dict[str, float] = {}
    count = 0
    for it in range(start, total):
        # dropout and drop-path draws depend on (seed, iteration, rank) only: resume-exact
        torch.manual_seed(sample_seed(cfg.seed, it, 1_000_000 + rank))
        terms = train_steps(model, optimizer, scheduler, batches, 1, device=device,
                            autocast=autocast, scaler=scaler, grad_clip=cfg.train.grad_clip)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        window_images += cfg.train.batch_size
        count += 1
        done = it + 1
        if done % log_every == 0 or done == total:
            elapsed = time.perf_counter() - window_start
            rate = (done - run_start_iter) / max(time.perf_counter() - run_start, 1e-9)
            logged = {k: v / count for k, v in sums.items()}
            logged.update(lr=scheduler.get_last_lr()[0], images_per_s=window_images / elapsed)
            if rank == 0:
                eta = format_duration((total - done) / rate) if rate > 0 else "?"
                log.info("[%s] it %d/%d  loss %.4f  lr %.2e  %.2f it/s  ETA %s", config["variant_id"],
                         done, total, logged["loss"], logged["lr"], rate, eta)
                if config.get("run_id"):
                    tracking.log_metrics(config["tracking_uri"], config["run_id"],
                                         {f"train/{k}": v for k, v in logged.items()}, done)
            sums, count, window_start, window_images = {}, 0, time.perf_counter(), 0
        if done % val_every == 0 or done == total:
            metrics = validate(model, cfg, root, table.num_classes, table.names, device, rank,
                               world)
            metrics["iteration"] = done
            metrics["ddp/weight_spread"] = weight_spread(model, world)
            if rank == 0 and config.get("run_id"):
                tracking.log_metrics(config["tracking_uri"], config["run_id"],
                                     {k: v for k, v in metrics.items() if k != "iteration"}, done)
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    save_training_state(d, model=model, optimizer=optimizer, scheduler=scheduler,
                                        scaler=scaler, iteration=done, cfg=cfg,
                                        variant=config["variant_id"], metrics=metrics,
                                        resumes=resumes)
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=ckpt)
