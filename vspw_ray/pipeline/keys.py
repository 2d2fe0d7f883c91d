"""Stage keys: a hash of the config sections a stage reads plus its inputs' keys, computed from
the config alone. A stage whose completion record holds the same key is skipped; a changed
setting changes that stage's key and, through the inputs, every later one."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vspw_ray.config import ExperimentConfig, to_dict, variant_id
from vspw_ray.ensemble.members import ensemble_settings
from vspw_ray.layout import infer_hash

__all__ = ["digest", "data_key", "train_key", "swa_key", "infer_key", "ensemble_key"]


def digest(*parts: Any, n: int = 12) -> str:
    """A short stable hash of JSON-able ``parts``."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def data_key(cfg: ExperimentConfig, splits: tuple[str, ...]) -> str:
    """The data check and class statistics: the dataset root and the splits read."""
    return digest("data", cfg.data.root, cfg.data.train_split, sorted(splits))


def train_key(resolved: ExperimentConfig) -> str:
    """Training: the variant_id (data, model, loss and train sections and the seed)."""
    return variant_id(resolved)


def swa_key(resolved: ExperimentConfig) -> str:
    """SWA: the trained variant plus the ``swa`` section."""
    return digest("swa", train_key(resolved), to_dict(resolved.swa))


def infer_key(resolved: ExperimentConfig, split: str, *, swa: bool) -> str:
    """Inference of one split: the model's key (SWA or training) plus the infer settings that
    change scores."""
    model = swa_key(resolved) if swa else train_key(resolved)
    return digest("infer", model, infer_hash(resolved.infer), split)


def ensemble_key(cfg: ExperimentConfig, member_keys: list[str]) -> str:
    """The ensemble and submission: its members' inference keys, the ensemble settings (as
    the ensemble's own identity counts them) and the fold seed."""
    return digest("ensemble", sorted(member_keys), ensemble_settings(cfg), cfg.data.fold_seed)
