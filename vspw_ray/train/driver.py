"""The driver side of `vspw-ray train`: connect to Ray, open the MLflow run, run TorchTrainer."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from vspw_ray.config import (ExperimentConfig, check_trainable, dump_yaml, resolve_variant,
                             to_dict, variant_id)
from vspw_ray.data import load_class_table, split_frames
from vspw_ray.data.stats import load_prior
from vspw_ray.storage import check_cluster_settings, resolve_storage
from vspw_ray.train.resources import check_feasible, wait_for_resources

__all__ = ["TrainResult", "train_variant", "connect_ray", "connect_and_find_run",
           "DASHBOARD_ENV", "prepare_config", "build_trainer", "git_commit"]


@dataclass(frozen=True)
class TrainResult:
    variant_id: str
    metrics: dict
    best_checkpoint: str | None
    latest_checkpoint: str | None
    run_id: str | None


DASHBOARD_ENV = "VSPW_RAY_DASHBOARD"  # "1": start the dashboard with a local Ray instance


def connect_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), or start a local Ray instance with
    enough logical CPUs for a driver plus the workers on a small machine.

    The local instance starts without the dashboard unless ``VSPW_RAY_DASHBOARD=1``
    (``--dashboard``): its processes cost seconds of start-up on a small machine. Ray Train's
    preemption watcher (an actor per run polling the nodes' drain state) is left off there too:
    a single local node is never drained. A cluster keeps Ray's settings."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # inherited by Ray's processes
    dashboard = os.environ.get(DASHBOARD_ENV, "0") not in ("", "0")
    ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=dashboard,
             log_to_driver=True)
    if not dashboard:
        print("local Ray instance started without its dashboard (--dashboard to have one)",
              file=sys.stderr, flush=True)


def connect_and_find_run(address: str | None, uri: str, experiment: str,
                         tags: dict[str, str], track: bool) -> str | None:
    """Connect to Ray and look up the unfinished MLflow run to resume, overlapped: the first use
    of a SQLite store creates its tables (seconds) while Ray starts."""
    from vspw_ray import tracking

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(tracking.find_run, uri, experiment, tags) if track else None
        connect_ray(address)
        return pending.result() if pending else None


def prepare_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check the cross-section rules, and make the user's relative paths absolute (workers run
    in other folders)."""
    check_trainable(cfg)
    def absolute(path: str | None) -> str | None:
        return path if path is None or "://" in path else str(Path(path).expanduser().resolve())

    la, distill = cfg.loss.logit_adjust, cfg.loss.distill
    return replace(
        cfg,
        data=replace(cfg.data, root=absolute(cfg.data.root)),
        model=replace(cfg.model, pretrained=absolute(cfg.model.pretrained),
                      init_checkpoint=absolute(cfg.model.init_checkpoint)),
        loss=replace(cfg.loss, logit_adjust=replace(la, prior=absolute(la.prior)),
                     distill=replace(distill, teacher=absolute(distill.teacher))),
    )


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def train_variant(cfg: ExperimentConfig, variant: str | None = None, *,
                  address: str | None = None, track: bool = True,
                  torch_threads: int = 1) -> TrainResult:
    """Train one variant of ``cfg`` to ``train.iters`` (resuming when its run exists)."""
    from vspw_ray import tracking

    resolved = resolve_variant(cfg, variant)
    vid = variant_id(resolved)
    check_cluster_settings(resolved, address or os.environ.get("RAY_ADDRESS"), track=track)
    resolved = prepare_config(resolved)
    # fail here, in seconds, rather than in every worker after each restart
    table = load_class_table(resolved.data.root)
    for split in (resolved.data.train_split, resolved.data.val_split):
        split_frames(resolved.data.root, split)
    if resolved.loss.logit_adjust.enabled and resolved.loss.logit_adjust.prior:
        load_prior(resolved.loss.logit_adjust.prior, table.names)
    storage = resolve_storage(resolved.storage.path)
    uri = tracking.resolve_tracking_uri(resolved.tracking.uri, storage)
    experiment = resolved.tracking.experiment or cfg.name
    tags = {"variant_id": vid, "stage": "train"}
    run_id = connect_and_find_run(address, uri, experiment, tags, track)
    check_feasible(resolved)
    wait_for_resources(resolved)
    family = resolved.model.family
    if not track:
        return _result(vid, build_trainer(resolved, vid, uri, None, torch_threads, storage).fit(), None)
    with tracking.open_run(uri, experiment, storage, run_id=run_id, run_name=vid,
                           tags={**tags, "family": family, "variant": variant or "base",
                                 "seed": str(resolved.seed), "git_commit": git_commit()},
                           params=tracking.flatten(to_dict(resolved))) as rid:
        out = _result(vid, build_trainer(resolved, vid, uri, rid, torch_threads, storage).fit(), rid)
        _log_summary(uri, rid, resolved, out, storage)
    return out


def build_trainer(cfg: ExperimentConfig, vid: str, uri: str, run_id: str | None, torch_threads: int,
                  storage: str, *, name: str | None = None, storage_path: str | None = None,
                  callbacks: list | None = None, train_fn=None, extra_config: dict | None = None,
                  best_by: str | None = "val_A/miou"):
    """The TorchTrainer of one run on ``cfg``'s workers, named ``name`` (default: the
    variant_id) under ``storage_path`` (default: ``<storage>/train``). ``train_fn`` (default:
    training) gets the loop config plus ``extra_config``; Ray Train keeps two checkpoints, the
    best by ``best_by`` and the latest (``best_by=None``: the two latest)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from vspw_ray.train.ray_train import train_loop_per_worker

    keep = ray.train.CheckpointConfig(num_to_keep=2)
    if best_by:
        keep = ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=best_by,
                                          checkpoint_score_order="max")
    return TorchTrainer(
        train_fn or train_loop_per_worker,
        train_loop_config={"experiment": to_dict(cfg), "variant_id": vid, "tracking_uri": uri,
                           "run_id": run_id, "torch_threads": torch_threads,
                           **(extra_config or {})},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker=dict(cfg.train.resources_per_worker) or None),
        run_config=ray.train.RunConfig(
            name=name or vid, storage_path=storage_path or f"{storage.rstrip('/')}/train",
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=keep,
        ),
    )


def _result(vid: str, result, run_id: str | None) -> TrainResult:
    if result.error:
        raise result.error
    best = result.get_best_checkpoint("val_A/miou", "max") if result.best_checkpoints else None
    return TrainResult(vid, dict(result.metrics or {}), best.path if best else None,
                       result.checkpoint.path if result.checkpoint else None, run_id)


def _log_summary(uri: str, run_id: str, cfg: ExperimentConfig, out: TrainResult,
                 storage: str) -> None:
    """Artifacts: the resolved YAML, the per-class IoU chart and the checkpoint locations."""
    import tempfile

    from vspw_ray import tracking
    from vspw_ray.plots import per_class_iou_chart

    with tempfile.TemporaryDirectory() as d:
        cfg_path = Path(d) / "config.yaml"
        cfg_path.write_text(dump_yaml(cfg))
        tracking.log_artifact(uri, run_id, cfg_path)
        ious = {k.split("/iou/", 1)[1]: v for k, v in out.metrics.items() if k.startswith("val_A/iou/")}
        if ious:
            chart = Path(d) / "per_class_iou_val_A.png"
            per_class_iou_chart(ious, chart, title=f"{out.variant_id}: per-class IoU, val fold A")
            tracking.log_artifact(uri, run_id, chart)
        loc = Path(d) / "checkpoints.txt"
        loc.write_text(f"best: {out.best_checkpoint}\nlatest: {out.latest_checkpoint}\n"
                       f"storage: {storage}\n")
        tracking.log_artifact(uri, run_id, loc)
