"""`vspw-ray swa`: stochastic weight averaging (seed section 2.2, Table 2) as a Ray Train job.

Training continues from a checkpoint for ``swa.extra_iters`` iterations with a cyclical
learning rate: each cycle of ``swa.every`` iterations decays linearly from ``lr_max`` to
``lr_min`` and restarts (torch's ``SWALR`` anneals to a constant instead). At the end of each
cycle the weights are a snapshot, folded into a running average
(``torch.optim.swa_utils.AveragedModel``). The average gets fresh BatchNorm statistics from
training batches (``update_bn``) and is saved as an ordinary checkpoint with its own variant_id
(``<base variant_id>-swa-<hash>``), so ``infer``, ``train --from`` and the ensemble use it like
any other. The base checkpoint, the last snapshot and the average are validated side by side.

Resumable like training: each snapshot is a checkpoint holding the running average and its
count, the optimizer and the schedule; data order and random draws continue the base run's
stream as a function of (seed, iteration, rank).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from vspw_ray import tracking
from vspw_ray.checkpoints import checkpoint_file, list_checkpoints, read_state, read_summary
from vspw_ray.config import (
    ConfigError,
    ExperimentConfig,
    SwaConfig,
    dump_yaml,
    resolve_variant,
    variant_id,
)
from vspw_ray.cost import measured_cost, train_held
from vspw_ray.data.datasets import sample_seed
from vspw_ray.ids import swa_variant_id
from vspw_ray.layout import RunLayout
from vspw_ray.metrics import VAL_A_MIOU, VAL_B_MIOU
from vspw_ray.plots import lr_schedule_chart
from vspw_ray.resources import check_feasible, wait_for_resources
from vspw_ray.runtime import open_stage
from vspw_ray.storage import is_uri, resolve_storage
from vspw_ray.stored_models import best_train_checkpoint, bind_teacher
from vspw_ray.train.driver import build_trainer, fit
from vspw_ray.train.loop import build_optimizer, train_steps
from vspw_ray.train.ray_train import (
    CHECKPOINT_FILE,
    ProgressLog,
    data_record,
    load_training_state,
    preemption_announced,
    preemption_metrics,
    report,
    setup_worker,
    step_seed,
    train_batches,
    training_state,
    unwrap,
    validate,
)

__all__ = ["cyclic_lr", "swa_scheduler", "swa_steps", "recompute_bn", "has_batchnorm",
           "swa_loop_per_worker", "swa_variant_id", "SwaResult", "swa_variant", "COMPARED"]

log = logging.getLogger("vspw_ray.train")

COMPARED = ("base", "snapshot", "swa")  # metric prefixes of the side-by-side report


def cyclic_lr(i: int, swa: SwaConfig) -> float:
    """Learning rate of SWA iteration ``i`` (0-based): linear from ``lr_max`` at a cycle's
    first iteration to ``lr_min`` at its last, where the snapshot is taken, then restart."""
    if swa.every == 1:
        return swa.lr_min
    t = (i % swa.every) / (swa.every - 1)
    return (1 - t) * swa.lr_max + t * swa.lr_min


def swa_scheduler(optimizer: torch.optim.Optimizer, swa: SwaConfig):
    """A ``LambdaLR`` following :func:`cyclic_lr`; each group's base lr is ``lr_max`` times its
    multiplier (the backbone's ``train.backbone_lr_mult``)."""
    for group in optimizer.param_groups:
        group.pop("initial_lr", None)  # a loaded optimizer state carries the old schedule's
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: cyclic_lr(i, swa) / swa.lr_max)


def swa_steps(model: nn.Module, average: AveragedModel, optimizer, scheduler, batches: Iterator,
              *, start: int, swa: SwaConfig, device: torch.device, autocast=None, scaler=None,
              grad_clip: float | None = None,
              before_step: Callable[[int], None] | None = None,
              on_step: Callable[[int, dict, float], None] | None = None,
              on_snapshot: Callable[[int], None] | None = None, forward=None) -> None:
    """SWA iterations ``start..swa.extra_iters``: one optimisation step each, a snapshot folded
    into ``average`` at the end of every cycle. ``before_step(i)`` seeds the step;
    ``on_step(done, loss_terms, lr)`` and ``on_snapshot(done)`` report."""

    for i in range(start, swa.extra_iters):
        if before_step:
            before_step(i)
        lr = scheduler.get_last_lr()[0]
        terms = train_steps(model, optimizer, scheduler, batches, 1, device=device,
                            autocast=autocast, scaler=scaler, grad_clip=grad_clip,
                            forward=forward)
        done = i + 1
        if on_step:
            on_step(done, terms, lr)
        if done % swa.every == 0:
            average.update_parameters(model.module if hasattr(model, "module") else model)
            if on_snapshot:
                on_snapshot(done)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class _LogProbs(nn.Module):
    """``model.log_probs`` as ``forward``: what ``update_bn`` calls on each batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.log_probs(images)


def recompute_bn(model: nn.Module, images: Iterable[torch.Tensor], device=None) -> None:
    """Replace BatchNorm running statistics by their average over ``images`` batches in train
    mode (torch's ``update_bn``); GroupNorm/LayerNorm models are left as they are."""
    if has_batchnorm(model):
        wrapper = _LogProbs(model).train(model.training)  # update_bn restores this mode
        update_bn(images, wrapper, device=device)


def _average_bn_buffers(model: nn.Module, world: int) -> None:
    """Each worker saw its own share of the batches: the mean over workers equals the
    cumulative average over all of them (equal batch counts)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for buf in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(buf)
                buf.div_(world)


def _validated(metrics: dict) -> bool:
    return VAL_A_MIOU in metrics and VAL_B_MIOU in metrics


@dataclass
class _SwaRun:
    """One worker's SWA job: the model being trained, its running average and where it is."""

    w: Any  # ray_train.Worker
    config: dict
    optimizer: torch.optim.Optimizer
    scheduler: Any
    average: AveragedModel
    start: int  # SWA iterations done before this (re)start
    resumes: list[int]
    base_metrics: dict

    def validate(self, model: nn.Module) -> tuple[dict, Any]:
        w = self.w
        return validate(model, w.cfg, w.cfg.data.root, w.table.num_classes, w.table.names,
                        w.device, w.rank, w.world)

    def state(self, done: int, **extra) -> dict | None:
        """Rank 0's resumable state at SWA iteration ``done``: the model, optimizer and
        schedule, and the running average with its count."""

        w, config = self.w, self.config
        if w.rank != 0:
            return None
        return training_state(
            model=w.model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=w.scaler, iteration=done, cfg=w.cfg, variant=config["variant_id"],
            resumes=self.resumes, kind="swa_state",
            parent_variant_id=config["parent_variant_id"], **data_record(config),
            base_checkpoint=config["base_checkpoint"],
            swa={"average": self.average.module.state_dict(),
                 "n_averaged": int(self.average.n_averaged),
                 "base_metrics": self.base_metrics}, **extra)


def _resume(w, config: dict, optimizer, state: dict) -> _SwaRun:
    """The run as a registered SWA checkpoint left it."""

    swa = w.cfg.swa
    unwrap(w.model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler = swa_scheduler(optimizer, swa)
    scheduler.load_state_dict(state["scheduler"])
    average = AveragedModel(unwrap(w.model), use_buffers=False)
    average.module.load_state_dict(state["swa"]["average"])
    average.n_averaged.fill_(state["swa"]["n_averaged"])
    start = int(state["iteration"])
    if w.rank == 0:
        log.info("[%s] resuming SWA at iteration %d/%d", config["variant_id"], start,
                 swa.extra_iters)
    return _SwaRun(w, config, optimizer, scheduler, average, start,
                   list(state.get("resumes", [])) + [start], state["swa"]["base_metrics"])


def _start(w, config: dict, optimizer) -> _SwaRun:
    """A new run from the base checkpoint: its weights, its Adam moments at SWA's learning
    rate, and its validated metrics (measured here when the checkpoint has none)."""

    net = unwrap(w.model)
    base = read_state(config["base_checkpoint"])
    net.load_state_dict(base["model"] if "model" in base else base)
    if isinstance(base.get("optimizer"), dict) and len(base["optimizer"]["param_groups"]) \
            == len(optimizer.param_groups):
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(base["optimizer"])  # Adam moments carry on
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
    run = _SwaRun(w, config, optimizer, swa_scheduler(optimizer, w.cfg.swa),
                  AveragedModel(net, use_buffers=False), 0, [], base.get("metrics", {}))
    if not _validated(run.base_metrics):
        run.base_metrics, _ = run.validate(w.model)
    return run


def _start_or_resume(w, config: dict) -> _SwaRun | None:
    """The run to continue: from Ray Train's latest checkpoint, else from the base checkpoint;
    None when the latest checkpoint is the finished average."""
    import ray.train

    optimizer = build_optimizer(unwrap(w.model), replace(w.cfg.train, lr=w.cfg.swa.lr_max))
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return _start(w, config, optimizer)
    with checkpoint.as_directory() as d:
        state = load_training_state(Path(d) / CHECKPOINT_FILE)
    if state.get("kind") == "swa_average":
        return None  # finished; the driver normally sees that before starting workers
    return _resume(w, config, optimizer, state)


def _swa_phase(run: _SwaRun) -> None:
    """The SWA iterations, a snapshot averaged in (and a checkpoint reported) every
    ``swa.every``."""

    w, config, swa = run.w, run.config, run.w.cfg.swa
    base_iter, total = int(config["base_iteration"]), swa.extra_iters
    batches = train_batches(w, seed=w.cfg.seed, start_iter=base_iter + run.start,
                            num_iters=base_iter + total)
    progress = ProgressLog(w, config, every=w.cfg.train.log_interval, total=total,
                           start=run.start, unit="swa it")

    def on_snapshot(done: int) -> None:
        if w.rank == 0:
            log.info("[%s] snapshot %d/%d at SWA iteration %d", config["variant_id"],
                     int(run.average.n_averaged), total // swa.every, done)
        report(w, {"swa_iteration": done, "snapshots": int(run.average.n_averaged)},
               run.state(done))

    def on_step(done: int, terms: dict, lr: float) -> None:
        progress.step(done, terms, lr)
        if preemption_announced(w, config, done) and done % swa.every:  # else: a snapshot
            report(w, preemption_metrics(config, done, swa_iteration=done,
                                         snapshots=int(run.average.n_averaged)), run.state(done))

    swa_steps(w.model, run.average, run.optimizer, run.scheduler, batches, start=run.start,
              swa=swa, device=w.device, autocast=w.autocast, scaler=w.scaler,
              grad_clip=w.cfg.train.grad_clip,
              before_step=lambda i: step_seed(w, base_iter + i), on_step=on_step,
              on_snapshot=on_snapshot, forward=w.forward)


def _refresh_bn(run: _SwaRun) -> None:
    """BatchNorm statistics of the average, recomputed on ``swa.bn_batches`` training batches
    (and averaged over workers); models without BatchNorm skip it."""

    w, swa = run.w, run.w.cfg.swa
    if not (has_batchnorm(run.average.module) and swa.bn_batches):
        return
    base_iter = int(run.config["base_iteration"])
    torch.manual_seed(sample_seed(w.cfg.seed, base_iter + swa.extra_iters, 2_000_000 + w.rank))
    bn = train_batches(w, seed=w.cfg.seed + 1, start_iter=0, num_iters=swa.bn_batches)
    recompute_bn(run.average.module, (b["image"] for b in bn), w.device)
    if w.world > 1:
        _average_bn_buffers(run.average.module, w.world)


def _finalise(run: _SwaRun, snapshot_metrics: dict) -> None:
    """Validate the average and report it, side by side with the base checkpoint and the
    last snapshot, as the run's last checkpoint (``kind: swa_average``, not resumable)."""

    total = run.w.cfg.swa.extra_iters
    swa_metrics, confusions = run.validate(run.average.module)
    metrics = {"swa_iteration": total, "snapshots": int(run.average.n_averaged), **swa_metrics}
    for prefix, values in zip(COMPARED, (run.base_metrics, snapshot_metrics, swa_metrics)):
        metrics.update({f"{prefix}/{k}": v for k, v in values.items()})
    final = None
    if run.w.rank == 0:
        final = {**run.state(total), "kind": "swa_average",
                 "model": run.average.module.state_dict(), "metrics": swa_metrics,
                 "comparison": metrics}
        for key in ("optimizer", "scheduler", "scaler"):  # an average is not resumed from
            final.pop(key)
        final["swa"] = {k: v for k, v in final["swa"].items() if k != "average"}
    report(run.w, metrics, final, confusions)


def swa_loop_per_worker(config: dict) -> None:
    """Ray Train worker. ``config``: as for training plus ``base_checkpoint``,
    ``base_iteration`` and ``parent_variant_id``. Start (or resume), the SWA iterations, the
    BatchNorm refresh of the average, and the average validated and reported."""

    w = setup_worker({**config, "skip_init_checkpoint": True})
    run = _start_or_resume(w, config)
    if run is None:
        return
    _swa_phase(run)
    snapshot_metrics, _ = run.validate(w.model)  # the last snapshot, to compare with
    _refresh_bn(run)
    _finalise(run, snapshot_metrics)


# ---------------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class SwaResult:
    variant_id: str
    parent_variant_id: str
    base_checkpoint: str
    checkpoint: str  # the average, an ordinary checkpoint folder
    metrics: dict  # base/..., snapshot/..., swa/... side by side
    run_id: str | None


def swa_variant(cfg: ExperimentConfig, variant: str | None = None, *,
                from_checkpoint: str | None = None, address: str | None = None,
                track: bool = True, torch_threads: int = 1,
                label: str | None = None, parent_run: str | None = None) -> SwaResult:
    """Run (or resume, or find finished) the SWA job of one variant (``label``: its name in
    MLflow, ``parent_run``: the run its run is a child of, as
    :func:`~vspw_ray.train.driver.train_variant`'s)."""

    resolved = bind_teacher(cfg, resolve_variant(cfg, variant))
    parent = variant_id(resolved)
    layout = RunLayout(resolve_storage(resolved.storage.path))
    if from_checkpoint and not is_uri(from_checkpoint):
        from_checkpoint = str(Path(from_checkpoint).expanduser().resolve())
    base_file = checkpoint_file(from_checkpoint or best_train_checkpoint(
        layout, parent, resolved.tune.metric))
    header = read_summary(base_file)
    owner = header.get("variant_id")
    if owner and owner != parent:
        raise ConfigError(
            f"checkpoint {base_file} belongs to variant_id {owner}, but the experiment and "
            f"--variant {variant or '(base)'} resolve to {parent} (other settings, or other "
            f"data at data.root: ids cover the data's fingerprint): pass the variant that "
            f"trained it with its data (vspw-ray config show EXPERIMENT.yaml lists the ids), "
            f"or start a new variant from it with vspw-ray train --from")
    base_iter = int(header.get("iteration") or 0)
    vid = swa_variant_id(parent, resolved.swa, base_iter)
    tags = {"parent_variant_id": parent, "family": resolved.model.family,
            "variant": label or variant or cfg.name, "base_checkpoint": base_file}
    finished = _finished_average(layout.swa_run(vid))
    with open_stage(resolved, "swa", {"variant_id": vid}, address=address, track=track,
                    connect=finished is None, run_name=f"{tags['variant']}/swa", extra_tags=tags,
                    parent=parent_run, experiment=cfg.tracking.experiment or cfg.name) as stage:
        if finished is not None:  # made before: nothing to run
            return SwaResult(vid, parent, base_file, finished[0], finished[1], stage.run_id)
        check_feasible(stage.cfg)
        wait_for_resources(stage.cfg)
        trainer = build_trainer(
            stage.cfg, vid, stage.tracking_uri, stage.run_id, torch_threads, stage.layout,
            storage_path=stage.layout.swa_root, train_fn=swa_loop_per_worker, best_by=None,
            extra_config={"parent_variant_id": parent, "base_checkpoint": base_file,
                          "base_iteration": base_iter})
        with measured_cost(stage.tracking_uri, stage.run_id, train_held(stage.cfg.train)):
            result = fit(trainer)
        if result.error:
            raise result.error
        out = SwaResult(vid, parent, base_file, result.checkpoint.path, dict(result.metrics),
                        stage.run_id)
        if stage.run_id:
            _log_run(stage, out)
    return out


def _finished_average(run_dir: str) -> tuple[str, dict] | None:
    """``(folder, comparison metrics)`` of the complete SWA average under ``run_dir``."""
    for path, _ in [(p, s) for p, s in list_checkpoints(run_dir) if s.get("kind") == "swa_average"]:
        return path, read_state(checkpoint_file(path))["comparison"]
    return None


def _log_run(stage, out: SwaResult) -> None:
    """The side-by-side metrics and the artifacts of a finished SWA job."""
    import tempfile

    compared = {k: v for k, v in out.metrics.items()
                if k.split("/", 1)[0] in COMPARED and isinstance(v, float)}
    tracking.log_metrics(stage.tracking_uri, stage.run_id, compared, stage.cfg.swa.extra_iters)
    with tempfile.TemporaryDirectory() as d:
        _write_artifacts(Path(d), stage.cfg, out)
        for path in sorted(Path(d).iterdir()):
            tracking.log_artifact(stage.tracking_uri, stage.run_id, path)


def comparison_rows(metrics: dict) -> list[tuple[str, dict[str, float | None]]]:
    """``(metric, {base, snapshot, swa})`` rows for the fold metrics in ``metrics``."""
    rows = []
    for fold in ("A", "B"):
        for key in ("miou", "fwiou", "vc8", "vc16"):
            name = f"val_{fold}/{key}"
            values = {p: metrics.get(f"{p}/{name}") for p in COMPARED}
            if any(v is not None for v in values.values()):
                rows.append((name, values))
    return rows


def format_comparison(metrics: dict) -> str:
    lines = [f"{'metric':<14}" + "".join(f"{p:>10}" for p in COMPARED) + f"{'swa-base':>10}"]
    for name, values in comparison_rows(metrics):
        cells = "".join(f"{100 * v:>10.2f}" if v is not None else f"{'-':>10}"
                        for v in values.values())
        gain = (f"{100 * (values['swa'] - values['base']):>+10.2f}"
                if values["swa"] is not None and values["base"] is not None else f"{'-':>10}")
        lines.append(f"{name:<14}{cells}{gain}")
    return "\n".join(lines)


def _write_artifacts(folder: Path, cfg: ExperimentConfig, out: SwaResult) -> None:
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    swa = cfg.swa
    lr_schedule_chart([cyclic_lr(i, swa) for i in range(swa.extra_iters)],
                      folder / "swa_lr_schedule.png",
                      snapshots=list(range(swa.every, swa.extra_iters + 1, swa.every)),
                      title=f"{out.variant_id}: cyclical lr, snapshot every {swa.every} it")
    (folder / "swa_comparison.txt").write_text(format_comparison(out.metrics) + "\n")
    (folder / "checkpoints.txt").write_text(f"base: {out.base_checkpoint}\n"
                                            f"swa average: {out.checkpoint}\n")
