"""The ensemble stage: the fusion of the variants' val scores searched (cross-fitted or held
out), reported, and applied to the test split as the submission."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from vspw_ray.config import ExperimentConfig, VariantSpec, to_dict
from vspw_ray.data.fingerprint import split_fingerprint
from vspw_ray.ensemble.members import ensemble_settings
from vspw_ray.ids import stage_key
from vspw_ray.layout import RunLayout
from vspw_ray.stages.base import StageContext, StageRecord, Variant, done_record

__all__ = ["NAME", "Record", "key", "done", "run", "PIPELINE_DEFAULT"]

NAME = "ensemble"
PIPELINE_DEFAULT = "the test split when pipeline.splits lists it"


@dataclass(frozen=True, kw_only=True)
class Record(StageRecord):
    stage = NAME
    ensemble_id: str = ""
    method: str = ""
    weights: dict[str, float] = field(default_factory=dict)  # the free groups' (the base's is 1)
    report: str = ""  # its folder: report.json, plots
    submission: str | None = None  # the submission's folder (PNGs, manifest.json)
    zip: str | None = None


def key(cfg: ExperimentConfig, member_keys: list[str]) -> str:
    """Its members' inference keys, the ensemble settings (as the ensemble's own identity counts
    them) and the fold seed."""
    return stage_key("ensemble", sorted(member_keys), ensemble_settings(cfg), cfg.data.fold_seed)


def done(layout: RunLayout, pipeline: str, item: str, key: str) -> Record | None:
    return done_record(Record, layout, pipeline, f"{NAME}:{item}", key)


def run(ctx: StageContext, item: str = "all", *, apply: str | None = PIPELINE_DEFAULT) -> Record:
    """Search (or reuse) the fusion of ``ctx``'s variants; write the submission of ``apply``
    (a split; None: none)."""
    from vspw_ray.ensemble.stage import run_ensemble

    cfg = with_variants(ctx.cfg, ctx.variants)
    if apply == PIPELINE_DEFAULT:
        apply = cfg.data.test_split if cfg.data.test_split in cfg.pipeline.splits else None
    out = run_ensemble(cfg, apply=apply, **ctx.where)
    return Record(ensemble_id=out.ensemble_id, method=out.method, weights=dict(out.weights),
                  report=out.path, run_id=out.run_id,
                  submission=out.submission.folder if out.submission else None,
                  zip=out.submission.zip if out.submission else None,
                  data_fingerprint=split_fingerprint(cfg.data.root, cfg.data.val_split),
                  figures={k: float(v) for k, v in out.metrics.items()
                           if k.startswith(("final/", "oof/ensemble/"))})


def with_variants(cfg: ExperimentConfig, variants: tuple[Variant, ...]) -> ExperimentConfig:
    """``cfg`` listing ``variants`` (a search's best configurations become variants whose
    overrides are every identity key of theirs); ``cfg`` itself when they are its own."""
    if not variants or [v.name for v in variants] == [s.name for s in cfg.variants]:
        return cfg
    specs = []
    for v in variants:
        data = to_dict(v.cfg)
        overrides = {k: val for section in ("data", "model", "loss", "train", "swa", "infer")
                     for k, val in _leaves(data[section], section)}
        specs.append(VariantSpec(v.name, v.cfg.seed, overrides))
    return replace(cfg, variants=tuple(specs))


def _leaves(node: Any, prefix: str):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}")
    else:
        yield prefix, node
