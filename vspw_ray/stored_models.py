"""Finding a variant's models in storage (the run layout names the places; this module reads
them): its best complete training checkpoint, the SWA average a config's ``swa`` section makes
of it, the model later stages use, and a self-distillation student's teacher."""

from __future__ import annotations

from dataclasses import replace

from vspw_ray.checkpoints import best_checkpoint, checkpoint_file, list_checkpoints, read_summary
from vspw_ray.config import (
    ConfigError,
    ExperimentConfig,
    resolve_variant,
    settings_id,
    teacher_pin,
    teacher_variant,
    variant_id,
)
from vspw_ray.ids import swa_variant_id
from vspw_ray.layout import RunLayout
from vspw_ray.storage import resolve_storage

__all__ = ["best_train_checkpoint", "swa_average", "model_checkpoint", "teacher_checkpoint",
           "bind_teacher"]


def best_train_checkpoint(layout: RunLayout, vid: str, metric: str) -> str:
    """The complete training checkpoint of ``vid`` with the highest ``metric``."""
    return best_checkpoint(layout.train_run(vid), metric)


def swa_average(layout: RunLayout, cfg: ExperimentConfig, base_checkpoint: str) -> str | None:
    """The complete SWA average that ``cfg``'s ``swa`` section makes of ``base_checkpoint``,
    or None when it has not been made."""
    base = read_summary(base_checkpoint)
    swa_vid = swa_variant_id(base["variant_id"], cfg.swa, int(base["iteration"] or 0))
    done = [p for p, s in list_checkpoints(layout.swa_run(swa_vid))
            if s.get("kind") == "swa_average"]
    return done[-1] if done else None


def model_checkpoint(layout: RunLayout, cfg: ExperimentConfig) -> str:
    """The checkpoint a resolved variant's later stages use: the complete SWA average made by
    this config's ``swa`` section, else the best complete training checkpoint by
    ``tune.metric``."""
    best = best_train_checkpoint(layout, variant_id(cfg), cfg.tune.metric)
    return swa_average(layout, cfg, best) or best


def teacher_checkpoint(layout: RunLayout, experiment: ExperimentConfig,
                       student: ExperimentConfig) -> str:
    """The checkpoint file of a resolved student's ``variant:NAME`` teacher: the teacher's SWA
    average when the pinned reference names one (``+swa-``), else its best complete training
    checkpoint.

    Raises:
        ConfigError: the teacher has no such checkpoint yet (the command that makes it is
            named).
    """
    ref = student.loss.distill.teacher
    name = teacher_variant(ref)
    teacher = resolve_variant(experiment, name)
    pinned, swa = teacher_pin(ref)
    if pinned is not None and pinned != settings_id(teacher):
        raise ConfigError(f"config key 'loss.distill.teacher': '{ref}' was pinned to "
                          f"settings {pinned}, but variant '{name}' of experiment "
                          f"'{experiment.name}' now resolves to {settings_id(teacher)}; "
                          f"resolve the student from the same experiment file")
    command = f"vspw-ray {{}} {experiment.name}.yaml --variant {name}"
    try:
        best = best_train_checkpoint(layout, variant_id(teacher), teacher.tune.metric)
    except FileNotFoundError:
        raise ConfigError(f"config key 'loss.distill.teacher': teacher variant '{name}' has "
                          f"no complete training checkpoint under {layout.storage} yet; train "
                          f"it first ({command.format('train')}, or run the pipeline, "
                          f"which orders teachers first)") from None
    if not swa:
        return checkpoint_file(best)
    average = swa_average(layout, teacher, best)
    if average is None:
        raise ConfigError(f"config key 'loss.distill.teacher': teacher variant '{name}' has "
                          f"no SWA average under {layout.storage} yet (pipeline.swa is on, so "
                          f"the student learns from it); make it first "
                          f"({command.format('swa')}, or run the pipeline)")
    return checkpoint_file(average)


def bind_teacher(experiment: ExperimentConfig, student: ExperimentConfig) -> ExperimentConfig:
    """``student`` with ``loss.distill.teacher_checkpoint`` set when its teacher is a variant
    of ``experiment`` (looked up in the student's storage); otherwise ``student`` unchanged."""
    d = student.loss.distill
    if not d.enabled or teacher_variant(d.teacher) is None or d.teacher_checkpoint:
        return student
    layout = RunLayout(resolve_storage(student.storage.path))
    found = teacher_checkpoint(layout, experiment, student)
    return replace(student, loss=replace(student.loss, distill=replace(
        d, teacher_checkpoint=found)))
