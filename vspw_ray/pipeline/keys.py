"""Stage keys: a hash of the config sections a stage reads, the fingerprint of the data it reads
and its inputs' keys, computed from the config and the data's listing. A stage whose completion
record holds the same key is skipped; a changed setting or changed data changes that stage's key
and, through the inputs, every later one."""

from __future__ import annotations

from vspw_ray.config import ExperimentConfig, to_dict, variant_id
from vspw_ray.data.fingerprint import data_fingerprint, split_fingerprint
from vspw_ray.ensemble.members import ensemble_settings
from vspw_ray.ids import stage_key, tta_hash

__all__ = ["data_splits", "data_key", "train_key", "swa_key", "infer_key", "ensemble_key"]


def data_splits(cfg: ExperimentConfig) -> list[str]:
    """The splits the pipeline reads: the training split and ``pipeline.splits``."""
    return sorted({cfg.data.train_split, *cfg.pipeline.splits})


def data_key(cfg: ExperimentConfig) -> str:
    """The data check and class statistics: the fingerprint of the splits read (not the
    dataset's path: a moved or copied dataset is the same data)."""
    splits = data_splits(cfg)
    return stage_key("data", data_fingerprint(cfg.data.root, splits), cfg.data.train_split, splits)


def train_key(resolved: ExperimentConfig) -> str:
    """Training: the variant_id (data, model, loss and train sections and the seed)."""
    return variant_id(resolved)


def swa_key(resolved: ExperimentConfig) -> str:
    """SWA: the trained variant plus the ``swa`` section."""
    return stage_key("swa", train_key(resolved), to_dict(resolved.swa))


def infer_key(resolved: ExperimentConfig, split: str, *, swa: bool) -> str:
    """Inference of one split: the model's key (SWA or training), the infer settings that
    change scores and the split's data fingerprint."""
    model = swa_key(resolved) if swa else train_key(resolved)
    return stage_key("infer", model, tta_hash(resolved.infer), split,
                  split_fingerprint(resolved.data.root, split))


def ensemble_key(cfg: ExperimentConfig, member_keys: list[str]) -> str:
    """The ensemble and submission: its members' inference keys, the ensemble settings (as
    the ensemble's own identity counts them) and the fold seed."""
    return stage_key("ensemble", sorted(member_keys), ensemble_settings(cfg), cfg.data.fold_seed)
