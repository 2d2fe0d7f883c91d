"""The inference stage: a variant's model (its SWA average, else its best training checkpoint)
run with test-time augmentation over one split by Ray Data, class scores into the score store.
An item is ``VARIANT/SPLIT``."""

from __future__ import annotations

from dataclasses import dataclass, field

from vspw_ray.config import ExperimentConfig
from vspw_ray.data.fingerprint import split_fingerprint
from vspw_ray.ids import stage_key, tta_hash
from vspw_ray.layout import RunLayout
from vspw_ray.stages import swa, train
from vspw_ray.stages.base import (
    StageContext,
    StageRecord,
    done_record,
    finals,
    mark_member_run,
)

__all__ = ["NAME", "Record", "item_of", "key", "done", "run"]

NAME = "infer"


@dataclass(frozen=True, kw_only=True)
class Record(StageRecord):
    stage = NAME
    member_key: str = ""  # the score store's member: checkpoint identity + infer settings
    variant_id: str = ""
    split: str = ""
    store: str = ""
    predictions: str | None = None
    frames: int = 0  # written by this run
    skipped: tuple[str, ...] = ()  # bad frames skipped (``infer.on_bad_frame: skip``), video/frame
    frames_per_s: float = 0.0
    store_bytes: int = 0
    metrics: dict = field(default_factory=dict)  # from the stored scores (a split with masks)


def item_of(variant: str | None, split: str) -> str:
    """The item of ``variant``'s inference on ``split`` (no variant: a checkpoint given alone)."""
    return f"{variant or ''}/{split}"


def key(resolved: ExperimentConfig, split: str, *, swa_model: bool) -> str:
    """The model's key (SWA or training), the infer settings that change scores and the split's
    data fingerprint."""
    model = swa.key(resolved) if swa_model else train.key(resolved)
    return stage_key("infer", model, tta_hash(resolved.infer), split,
                     split_fingerprint(resolved.data.root, split))


def done(layout: RunLayout, pipeline: str, item: str, key: str) -> Record | None:
    return done_record(Record, layout, pipeline, f"{NAME}:{item}", key)


def run(ctx: StageContext, item: str, *, checkpoint: str | None = None,
        store: str | None = None, predictions: str | None = None, progress=None) -> Record:
    """Infer ``item`` (``VARIANT/SPLIT``; ``/SPLIT`` with a ``checkpoint`` alone) with
    ``checkpoint``, else the model its SWA or training step recorded, else the variant's model
    in storage."""
    from vspw_ray.infer.job import run_inference

    name, split = item.rsplit("/", 1)
    v = ctx.variant(name or None) if name or checkpoint is None else None
    cfg = v.cfg if v else ctx.cfg
    model = (ctx.record(f"{swa.NAME}:{v.name}") or ctx.record(f"{train.NAME}:{v.name}")
             if v else None)
    out = run_inference(cfg, checkpoint or (model.checkpoint if model else None), split,
                        store=store, predictions=predictions, **ctx.where,
                        torch_threads=ctx.threads, progress=progress,
                        label=v.run_label if v else None)
    # the common final/val_{A,B}/... keys name folds of the val split: a test split's own
    # figures stay under the stage's "<split>/..." keys, never relabelled as val
    figures = finals(out.metrics or {}) if split == cfg.data.val_split else {}
    if v:
        mark_member_run(ctx, out.run_id, figures, v,
                        swa=isinstance(model, swa.Record))
    return Record(member_key=out.key, variant_id=out.variant_id, split=out.split,
                  store=out.store, predictions=out.predictions, frames=out.frames,
                  skipped=tuple(out.skipped), frames_per_s=out.frames_per_s,
                  store_bytes=out.store_bytes, metrics=dict(out.metrics or {}),
                  run_id=out.run_id, data_fingerprint=split_fingerprint(cfg.data.root, split),
                  figures=figures)
