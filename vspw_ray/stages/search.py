"""The search stage: the Ray Tune + Optuna sweep over the experiment's ``tune`` space; its best
configurations become the pipeline's variants."""

from __future__ import annotations

from dataclasses import dataclass

from vspw_ray.config import (
    ExperimentConfig,
    config_from_dict,
    load_yaml,
    to_dict,
    variant_fingerprint,
)
from vspw_ray.layout import RunLayout
from vspw_ray.stages.base import StageContext, StageRecord, Variant, done_record
from vspw_ray.storage import filesystem

__all__ = ["NAME", "Record", "key", "done", "run", "chosen_variants"]

NAME = "search"


@dataclass(frozen=True, kw_only=True)
class Record(StageRecord):
    stage = NAME
    sweep_id: str = ""
    best_configs: tuple[str, ...] = ()  # experiment YAMLs, best first (local path or URI)
    study_name: str = ""
    optuna_storage: str = ""
    summary: str = ""  # the trials' table and the selection-optimism report


def key(cfg: ExperimentConfig) -> str:
    """The sweep's id: what decides its trials and the fingerprint of their data."""
    from vspw_ray.tune.search import sweep_id  # Ray Tune: loaded only when the sweep is planned

    return sweep_id(cfg)


def done(layout: RunLayout, pipeline: str, item: str, key: str) -> Record | None:
    return done_record(Record, layout, pipeline, f"{NAME}:{item}", key)


def run(ctx: StageContext, item: str = "all") -> Record:
    from vspw_ray.tune.search import run_search

    out = run_search(ctx.cfg, **ctx.where, torch_threads=ctx.threads)
    return Record(sweep_id=out.sweep_id, best_configs=tuple(out.best_configs),
                  study_name=out.study_name, optuna_storage=out.optuna_storage,
                  summary=out.summary, run_id=out.run_id,
                  data_fingerprint=variant_fingerprint(ctx.cfg))


def chosen_variants(cfg: ExperimentConfig, record: Record) -> list[Variant]:
    """The sweep's best configurations as the pipeline's variants ``best1``, ``best2``, ...
    (read through pyarrow, local or remote), stored and tracked where ``cfg`` says."""
    variants = []
    for i, path in enumerate(record.best_configs, 1):
        fs, inner = filesystem(path)
        with fs.open_input_stream(inner) as f:
            data = load_yaml(f.read().decode())
        data.update(storage={"path": cfg.storage.path}, tracking=to_dict(cfg.tracking),
                    pipeline={**data.get("pipeline", {}), "search": False}, variants=[])
        variants.append(Variant(f"best{i}", config_from_dict(data)))
    return variants
