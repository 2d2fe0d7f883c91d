"""What every stage shares: the record base class (its completion record and its result), the
context a stage runs in (where, tracked how, which variants, the records of the steps it
follows), the pipeline's variants, and the common final keys of member runs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from vspw_ray.config import ExperimentConfig, resolve_variant, teacher_variant
from vspw_ray.layout import RunLayout
from vspw_ray.metrics import fold_metric
from vspw_ray.stages.records import headline, read_record

__all__ = ["StageRecord", "StageContext", "Variant", "variants_of", "teacher_of", "done_record",
           "finals", "mark_member_run", "FINAL_METRICS"]

FINAL_METRICS = tuple(fold_metric(f, k) for f in ("A", "B") for k in ("miou", "fwiou", "vc8",
                                                                       "vc16"))

R = TypeVar("R", bound="StageRecord")


@dataclass(frozen=True, kw_only=True)
class StageRecord:
    """A stage's completion record and result. Written as one flat JSON object: the fields by
    name, ``figures`` spread out under their own names (``final/val_A/miou``, ``cost/gpu_hours``,
    ...), so stored records stay readable across versions (a field a record lacks takes its
    default; a key no field names is ignored)."""

    stage = ""  # the stage's name, set by each subclass (a class attribute, not a field)
    run_id: str | None = None  # the stage's MLflow run (None: untracked)
    data_fingerprint: str = ""  # of the data the result was made from
    figures: Mapping[str, float] = field(default_factory=dict)

    def outputs(self) -> dict[str, Any]:
        named = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "figures"}
        return {**named, **self.figures}

    @classmethod
    def from_outputs(cls: type[R], outputs: Mapping[str, Any]) -> R:
        names = {f.name for f in fields(cls)} - {"figures"}
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in outputs.items()
                 if k in names}
        figures = {k: float(v) for k, v in outputs.items()
                   if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return cls(**known, figures=figures)

    def with_figures(self: R, more: Mapping[str, float]) -> R:
        return replace(self, figures={**self.figures, **more})

    @property
    def headline(self) -> tuple[str, float] | None:
        """``(name, value)`` of the figure this result is known by."""
        return headline(self.stage, self.figures)


@dataclass(frozen=True)
class Variant:
    name: str
    cfg: ExperimentConfig  # resolved, paths as the user wrote them (ids are computed from these)
    label: str | None = None  # its name in MLflow run names (default ``name``)

    @property
    def run_label(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class StageContext:
    """Where a stage runs and is tracked, and what it follows: the command line makes one with
    the experiment alone; the pipeline adds its parent run, its variants (a search's choices)
    and the records of the steps done so far."""

    cfg: ExperimentConfig  # the experiment
    address: str | None = None
    track: bool = True
    parent_run: str | None = None
    threads: int = 1  # torch threads per worker
    tracking_uri: str | None = None  # set by the pipeline: member runs get the common keys
    variants: tuple[Variant, ...] = ()  # default: the experiment's own
    records: Mapping[str, StageRecord] = field(default_factory=dict)  # step id -> record
    planned_key: str | None = None  # the key the pipeline planned this step under

    @property
    def where(self) -> dict[str, Any]:
        """The keyword arguments every stage function takes for its cluster and MLflow run."""
        return {"address": self.address, "track": self.track, "parent_run": self.parent_run}

    def variant(self, name: str | None) -> Variant:
        """The variant ``name`` (None: the experiment's base, named after it in MLflow)."""
        for v in self.variants:
            if v.name == name:
                return v
        if name is None or (name == "base" and not self.cfg.variants):
            return Variant("base", resolve_variant(self.cfg, None),
                           label=None if name else self.cfg.name)
        return Variant(name, resolve_variant(self.cfg, name))

    def trained_config(self, v: Variant) -> ExperimentConfig:
        """``v``'s config as training and SWA run it: a student bound to its teacher's
        checkpoint in storage (the teacher must be done), any other variant as it is."""
        if teacher_of(v) is None:
            return v.cfg
        from vspw_ray.stored_models import bind_teacher  # reads storage: only for students

        return bind_teacher(self.cfg, v.cfg)

    def record(self, step_id: str) -> StageRecord | None:
        return self.records.get(step_id)


def variants_of(cfg: ExperimentConfig) -> list[Variant]:
    """The experiment's variants, resolved (the base config when it lists none), each after
    the variant it learns from (``loss.distill.teacher: variant:NAME``)."""
    if not cfg.variants:
        return [Variant("base", resolve_variant(cfg, None))]
    pending = [Variant(v.name, resolve_variant(cfg, v.name)) for v in cfg.variants]
    ordered: list[Variant] = []
    while pending:  # resolve_variant refused circles, so every pass places one at least
        placed = {v.name for v in ordered}
        ready = [v for v in pending if teacher_of(v) in (None, *placed)]
        ordered += ready
        pending = [v for v in pending if v not in ready]
    return ordered


def teacher_of(v: Variant) -> str | None:
    """The name of the variant ``v`` distils from, if it learns from one of the experiment's."""
    d = v.cfg.loss.distill
    return teacher_variant(d.teacher) if d.enabled else None


def done_record(record_type: type[R], layout: RunLayout, pipeline: str, step_id: str,
                key: str) -> R | None:
    """The record of ``step_id`` when it completed under ``key``, else None."""
    stored = read_record(layout, pipeline, step_id)
    if stored is None or stored.get("key") != key:
        return None
    return record_type.from_outputs(stored.get("outputs", {}))


def finals(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The common final keys (``final/val_A/miou``, ...) from a stage's fold metrics."""
    return {f"final/{k}": float(metrics[k]) for k in FINAL_METRICS
            if isinstance(metrics.get(k), (int, float))}


def mark_member_run(ctx: StageContext, run_id: str | None, figures: Mapping[str, float],
                    v: Variant, *, swa: bool) -> None:
    """The same final metrics and short params on every member run of a pipeline, so runs of
    every stage sort and compare side by side in the MLflow UI and ``mlflow.search_runs``."""
    from vspw_ray import tracking

    if not run_id or not ctx.tracking_uri:
        return
    c = v.cfg
    la, ohem = c.loss.logit_adjust, c.loss.ohem
    params = {"family": c.model.family, "crop": "x".join(map(str, c.data.crop_size)),
              "ohem": f"{ohem.thresh:g}" if ohem.enabled else "off",
              "tau": f"{la.tau:g}" if la.enabled else "off",
              "distill": str(c.loss.distill.enabled).lower(), "swa": str(swa).lower(),
              "tta": f"{list(c.infer.scales)}{'+flip' if c.infer.flip else ''}",
              "pipeline_variant": v.name}
    tracking.log_metrics(ctx.tracking_uri, run_id, dict(figures), 0)
    tracking.log_new_params(ctx.tracking_uri, run_id, params)
