"""The training stage: one variant trained on Ray Train workers to ``train.iters`` (resumed when
its run exists), a student after its teacher's model."""

from __future__ import annotations

from dataclasses import dataclass, field

from vspw_ray.config import ExperimentConfig, variant_fingerprint, variant_id
from vspw_ray.layout import RunLayout
from vspw_ray.stages.base import (
    StageContext,
    StageRecord,
    done_record,
    finals,
    mark_member_run,
)

__all__ = ["NAME", "Record", "key", "done", "run"]

NAME = "train"


@dataclass(frozen=True, kw_only=True)
class Record(StageRecord):
    stage = NAME
    variant_id: str = ""
    checkpoint: str | None = None  # the best by ``tune.metric``
    latest_checkpoint: str | None = None
    metrics: dict = field(default_factory=dict)  # the last validation's, by fold


def key(resolved: ExperimentConfig) -> str:
    """The variant_id: data, model, loss and train sections, the seed and the data's
    fingerprint."""
    return variant_id(resolved)


def done(layout: RunLayout, pipeline: str, item: str, key: str) -> Record | None:
    return done_record(Record, layout, pipeline, f"{NAME}:{item}", key)


def run(ctx: StageContext, item: str | None) -> Record:
    """Train variant ``item`` (None: the experiment's base); a student is bound to its
    teacher's checkpoint first (its teacher must be done)."""
    from vspw_ray.train.driver import train_variant

    v = ctx.variant(item)
    cfg = ctx.trained_config(v)
    out = train_variant(cfg, None, **ctx.where, torch_threads=ctx.threads, label=v.run_label)
    figures = finals(out.metrics)
    mark_member_run(ctx, out.run_id, figures, v, swa=False)
    return Record(variant_id=out.variant_id, checkpoint=out.best_checkpoint,
                  latest_checkpoint=out.latest_checkpoint, run_id=out.run_id,
                  metrics=dict(out.metrics), data_fingerprint=variant_fingerprint(v.cfg),
                  figures=figures)
