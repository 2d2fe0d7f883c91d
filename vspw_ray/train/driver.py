"""The driver side of `vspw-ray train`: connect to Ray, open the MLflow run, run TorchTrainer."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

from vspw_ray import tracking
from vspw_ray.checkpoints import checkpoint_file, read_summary
from vspw_ray.config import (
    ConfigError,
    ExperimentConfig,
    dump_yaml,
    resolve_variant,
    to_dict,
    variant_fingerprint,
    variant_id,
)
from vspw_ray.cost import measured_cost, train_held
from vspw_ray.data import load_class_table, split_frames
from vspw_ray.data.stats import load_prior
from vspw_ray.layout import RunLayout
from vspw_ray.metrics import VAL_A_MIOU
from vspw_ray.plots import per_class_iou_chart
from vspw_ray.resources import check_feasible, wait_for_resources
from vspw_ray.runtime import open_stage
from vspw_ray.stored_models import bind_teacher
from vspw_ray.train.ray_train import (
    PAUSE_ENV,
    fault_setting,
    node_metrics,
    train_loop_per_worker,
)

__all__ = ["TrainResult", "train_variant", "build_trainer", "check_inputs", "data_tags"]


@dataclass(frozen=True)
class TrainResult:
    variant_id: str
    metrics: dict
    best_checkpoint: str | None
    latest_checkpoint: str | None
    run_id: str | None


def check_inputs(cfg: ExperimentConfig) -> None:
    """Fail here, in seconds, rather than in every worker after each restart: the class table,
    the splits, the prior, and a per-worker batch BatchNorm can train on."""
    table = load_class_table(cfg.data.root)
    for split in (cfg.data.train_split, cfg.data.val_split):
        split_frames(cfg.data.root, split)
    if cfg.loss.logit_adjust.enabled and cfg.loss.logit_adjust.prior:
        load_prior(cfg.loss.logit_adjust.prior, table.names)
    per_worker = cfg.train.batch_size // cfg.train.num_workers
    if per_worker < 2 and cfg.model.family == "upernet":
        raise ConfigError(
            f"config keys 'train.batch_size' ({cfg.train.batch_size}) and 'train.num_workers' "
            f"({cfg.train.num_workers}) give each worker a batch of {per_worker} image, and "
            f"BatchNorm cannot train on one image per batch; raise train.batch_size to at least "
            f"{2 * cfg.train.num_workers} or lower train.num_workers")


def data_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """The data a run learns from, for its MLflow tags and checkpoints: ``data_fingerprint``
    and, when it starts from other weights (``train --from``, ``model.init_checkpoint``),
    ``init_data_fingerprint`` and ``transfer`` (``same data`` or ``other data``: fine-tuning or
    transfer, allowed and recorded; ``unknown`` for weights that record no fingerprint)."""

    fingerprint = variant_fingerprint(cfg)
    tags = {"data_fingerprint": fingerprint}
    if cfg.model.init_checkpoint:
        header = read_summary(checkpoint_file(cfg.model.init_checkpoint))
        init = header.get("data_fingerprint")
        transfer = "unknown" if not init else "same data" if init == fingerprint else "other data"
        tags.update(init_data_fingerprint=init or "unknown", transfer=transfer)
    return tags


def train_variant(cfg: ExperimentConfig, variant: str | None = None, *,
                  address: str | None = None, track: bool = True,
                  torch_threads: int = 1, label: str | None = None,
                  parent_run: str | None = None) -> TrainResult:
    """Train one variant of ``cfg`` to ``train.iters`` (resuming when its run exists).
    ``label`` names it in MLflow (run ``<label>/train``, tag ``variant``; default the variant's
    name, or the experiment's for the base); its id stays the ``variant_id`` tag.
    ``parent_run``: the MLflow run its run is a child of (the pipeline's)."""
    resolved = bind_teacher(cfg, resolve_variant(cfg, variant))
    check_inputs(resolved)
    data = data_tags(resolved)
    vid = variant_id(resolved, fingerprint=data["data_fingerprint"])
    if data.get("transfer") == "other data":
        print(f"[{vid}] starts from weights trained on other data (fingerprint "
              f"{data['init_data_fingerprint']}, this data {data['data_fingerprint']}): recorded "
              f"as a transfer in its checkpoints and MLflow tags", flush=True)
    label = label or variant or cfg.name
    tags = {"family": resolved.model.family, "variant": label, "seed": str(resolved.seed), **data}
    with open_stage(resolved, "train", {"variant_id": vid}, address=address, track=track,
                    run_name=f"{label}/train", extra_tags=tags, parent=parent_run,
                    experiment=cfg.tracking.experiment or cfg.name) as stage:
        check_feasible(stage.cfg)
        wait_for_resources(stage.cfg)
        trainer = build_trainer(stage.cfg, vid, stage.tracking_uri, stage.run_id, torch_threads,
                                stage.layout, best_by=stage.cfg.tune.metric,
                                extra_config={k: v for k, v in data.items()
                                              if k == "init_data_fingerprint"})
        with measured_cost(stage.tracking_uri, stage.run_id, train_held(stage.cfg.train)):
            result = fit(trainer)
        out = _result(vid, result, stage.run_id, stage.cfg.tune.metric)
        if stage.run_id:
            _log_summary(stage.tracking_uri, stage.run_id, stage.cfg, out, stage.storage)
    return out


def build_trainer(cfg: ExperimentConfig, vid: str, uri: str | None, run_id: str | None,
                  torch_threads: int, layout: RunLayout, *, name: str | None = None,
                  storage_path: str | None = None, callbacks: list | None = None,
                  train_fn=None, extra_config: dict | None = None,
                  best_by: str | None = VAL_A_MIOU, preemption_checkpoints: bool = True):
    """The TorchTrainer of one run on ``cfg``'s workers, named ``name`` (default: the
    variant_id) under ``storage_path`` (default: the layout's training folder). ``train_fn``
    (default: training) gets the loop config plus ``extra_config``; Ray Train keeps two
    checkpoints, the best by ``best_by`` and the latest (``best_by=None``: the two latest).
    With ``preemption_checkpoints`` the workers checkpoint at once when Ray announces the drain
    of one of their nodes (a spot reclaim), and Ray Train resumes from it on new workers,
    counted against ``train.max_preemptions``, not ``train.max_failures``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    loop = train_fn or train_loop_per_worker
    if cfg.tracking.system_metrics and run_id:
        loop = functools.partial(node_metrics, loop, tracking.system_metrics_interval())
    keep = ray.train.CheckpointConfig(num_to_keep=2)
    if best_by:
        keep = ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=best_by,
                                          checkpoint_score_order="max")
    return TorchTrainer(
        loop,
        train_loop_config={"experiment": to_dict(cfg), "variant_id": vid, "tracking_uri": uri,
                           "run_id": run_id, "torch_threads": torch_threads,
                           "data_fingerprint": variant_fingerprint(cfg),
                           "fault_after": fault_setting(), "pause_after": fault_setting(PAUSE_ENV),
                           "checkpoint_score": best_by,
                           "preemption_checkpoints": preemption_checkpoints,
                           **(extra_config or {})},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker=dict(cfg.train.resources_per_worker) or None),
        run_config=ray.train.RunConfig(
            name=name or vid, storage_path=storage_path or layout.train_root,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.train.max_failures,
                max_preemption_failures=cfg.train.max_preemptions),
            checkpoint_config=keep,
            # Ray Train's INFO lines (resources requested, worker group started, process group
            # set up, model moved) stay in its log files under the session's logs/train; the
            # console carries this package's progress lines, and Ray Train's warnings and errors
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def fit(trainer):
    """``trainer.fit()``, from the main thread in a helper thread that it waits for. Ray Train
    registers a SIGINT handler of its own when ``fit`` runs in the main thread (it aborts the
    run and exits the process, 0 or 1), which would take a stop past this package's
    (:func:`vspw_ray.runtime.stop_on_sigterm`: MLflow runs ended KILLED, the cost logged, one
    "stopped" line, exit 130). A stop leaves the helper thread to the process's exit."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    done: dict = {}

    def run() -> None:
        try:
            done["result"] = trainer.fit()
        except BaseException as err:  # handed to the waiting thread as it is
            done["error"] = err

    helper = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.5)  # a wait with a timeout lets Ctrl-C and SIGTERM in
    if "error" in done:
        raise done["error"]
    return done["result"]


def _result(vid: str, result, run_id: str | None, metric: str) -> TrainResult:
    if result.error:
        raise result.error
    best = result.get_best_checkpoint(metric, "max") if result.best_checkpoints else None
    return TrainResult(vid, dict(result.metrics or {}), best.path if best else None,
                       result.checkpoint.path if result.checkpoint else None, run_id)


def _log_summary(uri: str, run_id: str, cfg: ExperimentConfig, out: TrainResult,
                 storage: str) -> None:
    """Artifacts: the resolved YAML, the per-class IoU chart and the checkpoint locations."""
    import tempfile

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
