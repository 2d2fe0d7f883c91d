"""The SWA stage: a trained variant continued on a cyclic schedule and its snapshots averaged
(the average is an ordinary checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vspw_ray.config import ExperimentConfig, to_dict, variant_fingerprint
from vspw_ray.ids import stage_key
from vspw_ray.layout import RunLayout
from vspw_ray.stages import train
from vspw_ray.stages.base import (
    StageContext,
    StageRecord,
    done_record,
    finals,
    mark_member_run,
)

__all__ = ["NAME", "Record", "key", "done", "run"]

NAME = "swa"


@dataclass(frozen=True, kw_only=True)
class Record(StageRecord):
    stage = NAME
    variant_id: str = ""
    parent_variant_id: str = ""
    base_checkpoint: str = ""
    checkpoint: str = ""  # the average
    metrics: dict = field(default_factory=dict)  # base/..., snapshot/..., swa/... side by side


def key(resolved: ExperimentConfig) -> str:
    """The trained variant plus the ``swa`` section."""
    return stage_key("swa", train.key(resolved), to_dict(resolved.swa))


def done(layout: RunLayout, pipeline: str, item: str, key: str) -> Record | None:
    return done_record(Record, layout, pipeline, f"{NAME}:{item}", key)


def run(ctx: StageContext, item: str | None, *, from_checkpoint: str | None = None) -> Record:
    """Average variant ``item`` (None: the base), from ``from_checkpoint``, else its training
    step's checkpoint, else its best training checkpoint in storage."""
    from vspw_ray.train.swa import swa_variant

    v = ctx.variant(item)
    cfg = ctx.trained_config(v)
    trained = ctx.record(f"{train.NAME}:{v.name}")
    if from_checkpoint is None and trained is not None:
        from_checkpoint = trained.checkpoint
    out = swa_variant(cfg, None, from_checkpoint=from_checkpoint, **ctx.where,
                      torch_threads=ctx.threads, label=v.run_label)
    figures = finals({k.removeprefix("swa/"): m for k, m in out.metrics.items()
                      if k.startswith("swa/")})
    mark_member_run(ctx, out.run_id, figures, v, swa=True)
    return Record(variant_id=out.variant_id, parent_variant_id=out.parent_variant_id,
                  base_checkpoint=out.base_checkpoint, checkpoint=out.checkpoint,
                  metrics=dict(out.metrics), run_id=out.run_id,
                  data_fingerprint=variant_fingerprint(v.cfg), figures=figures)
