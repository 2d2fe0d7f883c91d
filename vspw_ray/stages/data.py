"""The data stage: every split the pipeline reads checked, the class prior written where
logit-adjusted variants expect it, the data's fingerprints recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vspw_ray.config import ExperimentConfig
from vspw_ray.data.check import check_dataset
from vspw_ray.data.fingerprint import clear_cache, data_fingerprint
from vspw_ray.data.stats import class_stats, write_stats
from vspw_ray.errors import DataError
from vspw_ray.ids import stage_key
from vspw_ray.layout import RunLayout
from vspw_ray.stages.base import StageContext, StageRecord, done_record, variants_of

__all__ = ["NAME", "Record", "splits_read", "key", "done", "run"]

NAME = "data"


@dataclass(frozen=True, kw_only=True)
class Record(StageRecord):
    stage = NAME
    splits: tuple[str, ...] = ()
    priors: tuple[str, ...] = ()  # class-prior files written for logit-adjusted variants
    split_fingerprints: dict[str, str] = field(default_factory=dict)


def splits_read(cfg: ExperimentConfig) -> list[str]:
    """The splits the pipeline reads: the training split and ``pipeline.splits``."""
    return sorted({cfg.data.train_split, *cfg.pipeline.splits})


def key(cfg: ExperimentConfig) -> str:
    """The fingerprint of the splits read (not the dataset's path: a moved or copied dataset is
    the same data)."""
    splits = splits_read(cfg)
    return stage_key("data", data_fingerprint(cfg.data.root, splits), cfg.data.train_split, splits)


def done(layout: RunLayout, pipeline: str, item: str, key: str) -> Record | None:
    return done_record(Record, layout, pipeline, f"{NAME}:{item}", key)


def run(ctx: StageContext, item: str = "all") -> Record:
    """Check every split read; write the class priors; record the data's fingerprints. The data
    must not have changed since the pipeline planned on it (``ctx.planned_key``)."""
    cfg = ctx.cfg
    splits = splits_read(cfg)
    clear_cache()  # fingerprint the files as they are now, not as planned
    if ctx.planned_key is not None and key(cfg) != ctx.planned_key:
        raise DataError(f"the data under {cfg.data.root} changed while the pipeline planned "
                        f"(its fingerprint differs); re-run the same command to plan on it")
    problems = check_dataset(cfg.data.root, splits)
    if problems:
        shown = "; ".join(str(p) for p in problems[:5])
        raise DataError(f"{len(problems)} problems in {cfg.data.root}: {shown} (vspw-ray data "
                        f"check {cfg.data.root} lists them all)")
    priors = sorted({v.cfg.loss.logit_adjust.prior for v in variants_of(cfg)
                     if v.cfg.loss.logit_adjust.enabled and v.cfg.loss.logit_adjust.prior})
    for prior in priors:
        write_stats(class_stats(cfg.data.root, cfg.data.train_split), Path(prior).parent)
    return Record(splits=tuple(splits), priors=tuple(priors),
                  data_fingerprint=data_fingerprint(cfg.data.root, splits),
                  split_fingerprints={s: data_fingerprint(cfg.data.root, (s,)) for s in splits})
