"""Experiment configuration: frozen dataclasses loaded from one YAML per experiment.

Every stage reads the same :class:`ExperimentConfig`. A YAML file in ``experiments/`` holds
every section in full (no inheritance chains); the command line overrides single keys with
``section.key=value`` (the value is parsed as YAML, so ``train.lr=1e-4`` is a float and
``data.crop_size=[480,640]`` a list). Loading rejects unknown keys, wrong types and
out-of-range values with a message that names the key and the fix.

A ``variants:`` list describes several models to train from one experiment; each variant is the
base config with its own overrides and seed, and has a stable :func:`variant_id`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vspw_ray import ids
from vspw_ray.data.fingerprint import data_fingerprint
from vspw_ray.errors import ConfigError, DataError

__all__ = [
    "config_diff",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OhemConfig",
    "LogitAdjustConfig",
    "DistillConfig",
    "LossConfig",
    "TrainConfig",
    "SwaConfig",
    "SearchParam",
    "TuneConfig",
    "InferConfig",
    "EnsembleConfig",
    "TrackingConfig",
    "StorageConfig",
    "VariantSpec",
    "ExperimentConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "parse_override",
    "resolve_variant",
    "teacher_variant",
    "teacher_pin",
    "variant_id",
    "variant_fingerprint",
    "settings_id",
    "weight_settings",
    "prior_digest",
    "to_dict",
    "dump_yaml",
]


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {message}")


def _pair(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where the VSPW-layout dataset lives and how training frames are augmented.

    Sizes are ``(height, width)``; a single int means a square.
    """

    root: str = "data/synth"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    crop_size: tuple[int, int] = (480, 480)
    base_size: tuple[int, int] | None = None  # None: scale relative to each frame's own size
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    fold_seed: int = 0
    skip_bad_frames: bool = False
    loader_workers: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_size", _pair(self.crop_size))
        object.__setattr__(self, "base_size", _pair(self.base_size))
        _check(min(self.crop_size) >= 32, "data.crop_size", "must be at least 32 pixels per side")
        if self.base_size is not None:
            _check(min(self.base_size) >= 1, "data.base_size", "must be positive or null")
        lo, hi = self.ratio_range
        _check(0 < lo <= hi, "data.ratio_range", f"needs 0 < low <= high, got {lo}, {hi}")
        _check(0 < self.cat_max_ratio <= 1, "data.cat_max_ratio", "must be in (0, 1]")
        _check(0 <= self.flip_prob <= 1, "data.flip_prob", "must be in [0, 1]")
        _check(all(s > 0 for s in self.std), "data.std", "every value must be positive")
        _check(self.loader_workers >= 0, "data.loader_workers", "must be >= 0")
        for key in ("train_split", "val_split", "test_split"):
            _check(bool(getattr(self, key)), f"data.{key}", "must name a split file (e.g. 'val')")


_FAMILIES = ("upernet", "maskformer")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. ``backbone`` is any timm Swin name; ``backbone_kwargs`` shrink or change it
    (``embed_dim``, ``depths``, ``num_heads``, ``window_size``) so tiny test models and Swin-L
    come from the same code."""

    family: Literal["upernet", "maskformer"] = "upernet"
    backbone: str = "swin_tiny_patch4_window7_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None  # local .safetensors/.pth file; nothing is downloaded
    # whole-model weights to start from (a training or SWA checkpoint.pt): `train --from`
    init_checkpoint: str | None = None
    drop_path_rate: float = 0.3
    # UperNet
    channels: int = 512
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    aux_weight: float = 0.4
    aux_channels: int = 256
    dropout: float = 0.1
    # MaskFormer
    num_queries: int = 100
    hidden_dim: int = 256
    mask_dim: int = 256
    dec_layers: int = 6
    nheads: int = 8
    dim_feedforward: int = 2048
    dec_dropout: float = 0.1
    # Set by the trainer, not by users: SyncBatchNorm needs several GPU workers.
    sync_bn: bool = False

    def __post_init__(self) -> None:
        _check(self.family in _FAMILIES, "model.family", f"must be one of {_FAMILIES}")
        _check(
            self.backbone.startswith("swin"),
            "model.backbone",
            f"'{self.backbone}' is not a timm Swin model (e.g. swin_large_patch4_window12_384)",
        )
        _check(0 <= self.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")
        _check(self.channels > 0, "model.channels", "must be positive")
        _check(self.aux_weight >= 0, "model.aux_weight", "must be >= 0")
        _check(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")
        _check(self.num_queries > 0, "model.num_queries", "must be positive")
        _check(self.dec_layers > 0, "model.dec_layers", "must be positive")
        _check(self.hidden_dim % self.nheads == 0, "model.hidden_dim", "must divide by model.nheads")
        if self.pretrained is not None:
            _check(bool(self.pretrained), "model.pretrained", "give a file path or null")


@dataclass(frozen=True)
class OhemConfig:
    enabled: bool = False
    thresh: float = 0.7
    min_kept: int = 200_000

    def __post_init__(self) -> None:
        _check(0 < self.thresh <= 1, "loss.ohem.thresh", "must be in (0, 1]")
        _check(self.min_kept >= 0, "loss.ohem.min_kept", "must be >= 0")


@dataclass(frozen=True)
class LogitAdjustConfig:
    enabled: bool = False
    tau: float = 0.03
    prior: str | None = None  # class_prior.json from `vspw-ray data stats`; needed when enabled
    init_scale: float = 16.0

    def __post_init__(self) -> None:
        _check(self.tau >= 0, "loss.logit_adjust.tau", "must be >= 0")
        _check(self.init_scale > 0, "loss.logit_adjust.init_scale", "must be positive")


@dataclass(frozen=True)
class DistillConfig:
    enabled: bool = False
    # a checkpoint of a model with the same architecture, or ``variant:NAME``: the model of the
    # experiment's variant NAME (its SWA average when ``pipeline.swa`` is on), trained first
    teacher: str | None = None
    weight: float = 1.0
    temperature: float = 1.0
    # runtime: the checkpoint a ``variant:`` teacher was found at (not part of the variant_id;
    # the pinned reference is)
    teacher_checkpoint: str | None = None

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "loss.distill.weight", "must be >= 0")
        _check(self.temperature > 0, "loss.distill.temperature", "must be positive")
        if self.enabled:
            _check(
                self.teacher is not None,
                "loss.distill.teacher",
                "self-distillation needs a teacher: a checkpoint path or variant:NAME",
            )


@dataclass(frozen=True)
class LossConfig:
    ohem: OhemConfig = field(default_factory=OhemConfig)
    logit_adjust: LogitAdjustConfig = field(default_factory=LogitAdjustConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # MaskFormer set criterion
    no_object_weight: float = 0.1
    class_weight: float = 1.0
    mask_weight: float = 20.0
    dice_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(0 <= self.no_object_weight <= 1, "loss.no_object_weight", "must be in [0, 1]")
        for key in ("class_weight", "mask_weight", "dice_weight"):
            _check(getattr(self, key) >= 0, f"loss.{key}", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    iters: int = 160_000
    batch_size: int = 16  # global: split across workers
    lr: float = 6e-5
    weight_decay: float = 0.01
    backbone_lr_mult: float = 1.0
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    grad_clip: float | None = None
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"  # auto: torch.compile on CUDA, eager on CPU
    log_interval: int = 50
    val_interval: int = 16_000
    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    max_failures: int = 3
    # node preemptions (a spot node drained) resumed from, counted apart from max_failures;
    # -1: no limit (Ray's default)
    max_preemptions: int = -1
    resource_wait_s: float = 600.0

    def __post_init__(self) -> None:
        _check(self.iters > 0, "train.iters", "must be positive")
        _check(self.batch_size > 0, "train.batch_size", "must be positive")
        _check(self.num_workers > 0, "train.num_workers", "must be positive")
        _check(
            self.batch_size % self.num_workers == 0,
            "train.batch_size",
            f"the global batch {self.batch_size} must divide by train.num_workers={self.num_workers}",
        )
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.backbone_lr_mult > 0, "train.backbone_lr_mult", "must be positive")
        _check(self.warmup_iters >= 0, "train.warmup_iters", "must be >= 0")
        _check(0 < self.warmup_ratio <= 1, "train.warmup_ratio", "must be in (0, 1]")
        _check(self.amp in ("auto", "bf16", "fp16", "fp32"), "train.amp", "auto, bf16, fp16 or fp32")
        _check(self.compile in ("auto", "on", "off"), "train.compile",
               "auto (compiled on CUDA, eager on CPU), on or off")
        _check(self.log_interval > 0, "train.log_interval", "must be positive")
        _check(self.val_interval > 0, "train.val_interval", "must be positive")
        _check(self.max_failures >= -1, "train.max_failures", "must be >= -1 (-1: retry forever)")
        _check(self.max_preemptions >= -1, "train.max_preemptions",
               "must be >= -1 (-1: resume after every preemption)")
        if self.grad_clip is not None:
            _check(self.grad_clip > 0, "train.grad_clip", "must be positive or null")


@dataclass(frozen=True)
class SwaConfig:
    extra_iters: int = 20_000
    every: int = 2_000
    lr_max: float = 6e-5
    lr_min: float = 6e-7
    bn_batches: int = 100

    def __post_init__(self) -> None:
        _check(self.every > 0, "swa.every", "must be positive")
        _check(
            self.extra_iters >= self.every and self.extra_iters % self.every == 0,
            "swa.extra_iters",
            f"must be a positive multiple of swa.every={self.every}",
        )
        _check(0 < self.lr_min <= self.lr_max, "swa.lr_min", "needs 0 < lr_min <= lr_max")
        _check(self.bn_batches >= 0, "swa.bn_batches", "must be >= 0")


_PARAM_TYPES = ("categorical", "uniform", "loguniform", "int")


@dataclass(frozen=True)
class SearchParam:
    """One searched config key.

    ``when`` makes the parameter conditional: ``{"loss.ohem.enabled": true}`` samples it only in
    trials where that (searched or fixed) key has that value.
    """

    type: Literal["categorical", "uniform", "loguniform", "int"]
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: int | None = None
    when: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # filled in from the mapping key by TuneConfig

    def __post_init__(self) -> None:
        where = f"tune.space.{self.key}" if self.key else "tune.space"
        _check(self.type in _PARAM_TYPES, f"{where}.type", f"must be one of {_PARAM_TYPES}")
        if self.type == "categorical":
            _check(bool(self.choices), f"{where}.choices", "a categorical parameter needs choices")
            return
        _check(
            self.low is not None and self.high is not None,
            where,
            f"a {self.type} parameter needs 'low' and 'high'",
        )
        _check(self.low < self.high, where, f"needs low < high, got {self.low} >= {self.high}")
        if self.type == "loguniform":
            _check(self.low > 0, f"{where}.low", "a loguniform parameter needs low > 0")


@dataclass(frozen=True)
class TuneConfig:
    num_samples: int = 16
    iters: int = 8_000  # shortened schedule per trial
    metric: str = "val_A/miou"
    mode: Literal["max", "min"] = "max"
    seed: int = 0
    grace_period: int = 2_000
    reduction_factor: int = 3
    storage: str | None = None  # Optuna RDB URL; None: sqlite file in the storage path
    top_k: int = 3
    # trials at once; None: from the cluster (GPUs / GPUs per trial, or CPUs on a CPU cluster)
    max_concurrent_trials: int | None = None
    # resources of each trial's driver (it runs the TorchTrainer); on a cluster add a custom
    # resource of your on-demand nodes to keep trial drivers off spot nodes
    driver_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    space: dict[str, SearchParam] = field(default_factory=dict)
    # configurations to try first ({searched key: value}, e.g. the seed's known settings);
    # Optuna's enqueue_trial (Tune's points_to_evaluate does not work with these spaces)
    enqueue: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _check(self.num_samples > 0, "tune.num_samples", "must be positive")
        _check(self.iters > 0, "tune.iters", "must be positive")
        _check(self.mode in ("max", "min"), "tune.mode", "max or min")
        _check(self.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2")
        _check(self.top_k > 0, "tune.top_k", "must be positive")
        _check(self.grace_period > 0, "tune.grace_period", "must be positive")
        _check(self.grace_period <= self.iters, "tune.grace_period",
               f"must be <= tune.iters={self.iters}")
        _check(self.max_concurrent_trials is None or self.max_concurrent_trials > 0,
               "tune.max_concurrent_trials", "must be positive (or null: from the cluster)")


@dataclass(frozen=True)
class InferConfig:
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    flip: bool = True
    batch_size: int = 1
    score_scale: float = 0.25  # stored score resolution relative to the frame
    top_k: int = 8
    score_step: float = 0.03125  # nats per uint8 code of the stored log-probabilities
    on_bad_frame: Literal["fail", "skip"] = "fail"
    actors: int | None = None  # model actors; None: one per GPU, or the CPUs left after reads

    def __post_init__(self) -> None:
        _check(len(self.scales) > 0 and all(s > 0 for s in self.scales), "infer.scales",
               "give one or more positive ratios")
        _check(self.batch_size > 0, "infer.batch_size", "must be positive")
        _check(0 < self.score_scale <= 1, "infer.score_scale", "must be in (0, 1]")
        _check(self.top_k > 0, "infer.top_k", "must be positive")
        _check(self.on_bad_frame in ("fail", "skip"), "infer.on_bad_frame", "fail or skip")
        _check(0 < self.score_step <= 1, "infer.score_step", "must be in (0, 1]")
        _check(self.actors is None or self.actors > 0, "infer.actors", "must be positive or null")


@dataclass(frozen=True)
class EnsembleConfig:
    """The hierarchical ensemble (seed section 2.3): members grouped (strong / weak / auxiliary),
    probabilities averaged inside each group, group weights searched on fold A of val."""

    members: tuple[str, ...] = ()  # variant names or ids; empty: every variant of the experiment
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # explicit: group -> members
    base_group: str = "strong"  # its weight is fixed at 1
    strong: int = 3  # the seed's rule: top members of the base family form "strong" ...
    auxiliary: int = 6  # ... and the other family's top ones "aux"
    space: Literal["prob", "log"] = "prob"  # mean of probabilities, or of log-probabilities
    method: Literal["tune", "grid", "greedy"] = "tune"
    weight_range: tuple[float, float] = (0.0, 2.0)
    grid_step: float = 0.1  # grid method (and the heatmap): weights low, low+step, ..., high
    num_samples: int = 64  # Tune trials
    sample_rate: float = 0.03  # share of valid pixels per frame in the pixel sample
    min_per_class: int = 16  # pixels kept per class present in a frame (all when fewer)
    greedy_rounds: int = 10
    greedy_init: int = 1  # greedy: start from the N best members on the selecting fold
    bags: int = 1  # greedy: bagging over resampled val videos, the bags' weights averaged
    inner_weights: bool = True  # tune: each member's weight inside its group searched too
    candidates: int = 3  # the method's best points, rescored beside every member and the mean
    selection: Literal["crossfit", "holdout"] = "crossfit"  # crossfit: A->B and B->A
    seed: int = 0
    allow_val_trained: bool = False  # members trained on val videos are refused unless true

    def __post_init__(self) -> None:
        lo, hi = self.weight_range
        _check(0 <= lo < hi, "ensemble.weight_range", "needs 0 <= low < high")
        _check(self.num_samples > 0, "ensemble.num_samples", "must be positive")
        _check(0 < self.grid_step <= hi - lo, "ensemble.grid_step",
               f"must be in (0, {hi - lo}] (the width of ensemble.weight_range)")
        _check(0 < self.sample_rate <= 1, "ensemble.sample_rate", "must be in (0, 1]")
        _check(self.min_per_class >= 1, "ensemble.min_per_class", "must be at least 1")
        _check(self.strong >= 1 and self.auxiliary >= 0, "ensemble.strong",
               "strong must be at least 1 and auxiliary at least 0")
        _check(self.greedy_rounds >= 1, "ensemble.greedy_rounds", "must be at least 1")
        _check(self.greedy_init >= 1, "ensemble.greedy_init", "must be at least 1")
        _check(self.bags >= 1, "ensemble.bags", "must be at least 1 (1: no bagging)")
        _check(self.candidates >= 1, "ensemble.candidates", "must be at least 1")
        _check(self.selection in ("crossfit", "holdout"), "ensemble.selection",
               "crossfit (choose on A, score on B and back) or holdout (A selects, B reports)")
        _check(self.space in ("prob", "log"), "ensemble.space", "prob or log")
        _check(self.method in ("tune", "grid", "greedy"), "ensemble.method", "tune, grid or greedy")
        if self.groups:
            _check(
                self.base_group in self.groups,
                "ensemble.base_group",
                f"'{self.base_group}' is not one of the groups {sorted(self.groups)}",
            )


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # None: sqlite:///<storage.path>/mlflow.db
    experiment: str | None = None  # None: the experiment's name
    # MLflow's system metrics on every stage's run (CPU, memory, disk, network, GPU where
    # nvidia-ml-py finds one): the driver's as system/*, each training node's as system/node-*/*
    system_metrics: bool = False

    def __post_init__(self) -> None:
        if self.uri is not None:
            _check(
                not self.uri.startswith("file:") and not self.uri.startswith("/"),
                "tracking.uri",
                "MLflow's file store is not supported; use sqlite:////abs/path.db or an http(s) server",
            )


@dataclass(frozen=True)
class StorageConfig:
    path: str = "runs"  # local directory, shared mount, s3://bucket/prefix or gs://bucket/prefix

    def __post_init__(self) -> None:
        _check(bool(self.path), "storage.path", "give a directory or a URI such as s3://bucket/runs")


@dataclass(frozen=True)
class PipelineConfig:
    """`vspw-ray pipeline`: which stages run and how many variants at once."""

    search: bool = False  # first a Tune sweep; its top tune.top_k configs are then the variants
    swa: bool = True  # average each variant's weights after training
    splits: tuple[str, ...] = ("val", "test")  # inferred for the ensemble ("val") and submission
    max_concurrent: int | None = None  # variants in flight; None: as many as the cluster holds

    def __post_init__(self) -> None:
        _check("val" in self.splits, "pipeline.splits",
               "must include val (the ensemble is searched and scored on it)")
        _check(self.max_concurrent is None or self.max_concurrent > 0, "pipeline.max_concurrent",
               "must be positive (or null: from the cluster)")


@dataclass(frozen=True)
class VariantSpec:
    name: str
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.name), "variants[].name", "every variant needs a name")
        for key in self.overrides:
            _check(
                not key.startswith(("variants", "tune", "ensemble", "tracking", "storage",
                                    "pipeline")),
                f"variants[{self.name}].overrides.{key}",
                "a variant may only override data, model, loss, train, swa and infer keys",
            )


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    swa: SwaConfig = field(default_factory=SwaConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    variants: tuple[VariantSpec, ...] = ()

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "name", "a non-empty name without '/'")
        if self.model.family == "maskformer":
            _check(
                not self.loss.ohem.enabled,
                "loss.ohem.enabled",
                "OHEM applies to UperNet only (the seed found no effect on MaskFormer); "
                "set loss.ohem.enabled=false or model.family=upernet",
            )
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _check(not dupes, "variants", f"variant names must be unique, repeated: {dupes}")


# --------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with type checks
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, key)
    if origin is Literal:
        _check(value in args, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, Mapping), key, f"must be a mapping of {tp.__name__} fields")
        return _build(tp, value, key)
    if origin is tuple:
        return _convert_tuple(value, args, key)
    if origin in (dict, Mapping):
        return _convert_mapping(value, args, key)
    return _convert_scalar(value, tp, key)


def _convert_union(value: Any, args: tuple, key: str) -> Any:
    if value is None:
        _check(type(None) in args, key, "must not be null")
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, key)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[-1] if len(errors) == 1 else f"config key '{key}': "
                      f"{value!r} matches none of {[_type_name(a) for a in args]}")


def _convert_tuple(value: Any, args: tuple, key: str) -> tuple:
    if args == (int, int) and isinstance(value, int) and not isinstance(value, bool):
        return (value, value)  # a size (h, w) given as one int: a square
    _check(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
    if args and args[-1] is Ellipsis:
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if args:
        _check(len(value) == len(args), key, f"must have {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    return tuple(value)


def _convert_mapping(value: Any, args: tuple, key: str) -> dict:
    _check(isinstance(value, Mapping), key, f"must be a mapping, got {value!r}")
    _, vtp = args if args else (str, Any)
    out = {}
    for k, v in value.items():
        _check(isinstance(k, str), key, f"keys must be strings, got {k!r}")
        if dataclasses.is_dataclass(vtp):
            _check(isinstance(v, Mapping), f"{key}.{k}", "must be a mapping")
            v = {**v, "key": k} if "key" in {f.name for f in dataclasses.fields(vtp)} else v
        out[k] = _convert(v, vtp, f"{key}.{k}")
    return out


def _convert_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key,
               f"must be an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for config key '{key}'")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        known = ", ".join(sorted(names))
        raise ConfigError(f"unknown config key '{where}{unknown[0]}' (known keys here: {known})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"config section '{prefix or 'top level'}': {err}") from None


def config_from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a plain mapping (as read from YAML) into an :class:`ExperimentConfig`."""
    if not isinstance(data, Mapping):
        raise ConfigError("an experiment config must be a mapping of sections")
    return _build(ExperimentConfig, data)


def to_dict(cfg: Any) -> Any:
    """Plain Python (lists, dicts, scalars) for YAML/JSON/MLflow."""
    if dataclasses.is_dataclass(cfg):
        out = {}
        for f in dataclasses.fields(cfg):
            if f.name == "key" and isinstance(cfg, SearchParam):
                continue
            out[f.name] = to_dict(getattr(cfg, f.name))
        return out
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


class _ConfigLoader(yaml.SafeLoader):
    """YAML as users write configs: only ``true``/``false`` are booleans (YAML 1.2), so
    ``train.compile: on`` means the string "on", not True as YAML 1.1 reads it."""


_BOOL = "tag:yaml.org,2002:bool"
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parse config YAML (files, overrides, stored configs) with YAML 1.2's booleans."""
    return yaml.load(text, Loader=_ConfigLoader)  # a SafeLoader: builds plain data only


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of every setting; variants keyed by their name, not their position."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "variants" and not prefix:
                for v in value:
                    out.update(_leaves({k: x for k, x in v.items() if k != "name"},
                                       f"variants[{v['name']}]."))
                continue
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def config_diff(a: ExperimentConfig, b: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """``(key, value in a, value in b)`` for every setting that differs, in ``a``'s order then
    ``b``'s (a variant only one of them has: its settings against ``None``)."""
    left, right = _leaves(to_dict(a)), _leaves(to_dict(b))
    keys = list(left) + [k for k in right if k not in left]
    return [(k, left.get(k), right.get(k)) for k in keys if left.get(k) != right.get(k)]


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 1e-4)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key before '='")
    value = load_yaml(raw) if raw.strip() else None
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return key, value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c in text.lower() for c in "e.") and not text.lower().startswith(("inf", "nan"))


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict:
    """Return a deep copy of ``data`` with dotted-key overrides applied."""
    out = json.loads(json.dumps(data))  # deep copy of plain YAML data
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        _set_path(out, key, value)
    return out


def _fix_yaml_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node):
        return float(node)
    return node


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load an experiment YAML, apply ``section.key=value`` overrides and validate.

    Relative ``data.root`` and ``storage.path`` stay as written: they are resolved against the
    working directory of the command, like every other path a user types.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment config {path} does not exist (see experiments/)")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (name, data, model, ...)")
    data = apply_overrides(_fix_yaml_floats(data), overrides)
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------

# Keys that change where or how fast a run goes, not what it learns: left out of variant_id so
# that moving the dataset or adding workers keeps a variant's checkpoints and scores.
_RUNTIME_KEYS = {
    "data": {"root", "loader_workers", "skip_bad_frames"},
    "train": {"log_interval", "use_gpu", "resources_per_worker", "max_failures", "max_preemptions",
              "resource_wait_s", "compile"},
    "model": {"pretrained", "sync_bn"},
    "loss": {"distill.teacher_checkpoint"},
}
_IDENTITY_SECTIONS = ("data", "model", "loss", "train")


def resolve_variant(cfg: ExperimentConfig, name: str | None) -> ExperimentConfig:
    """The config one variant trains with: the base config plus the variant's overrides and seed.

    ``name`` may be a variant name or its variant_id; ``None`` selects the base config when the
    experiment lists no variants, and is an error otherwise. A ``variant:NAME`` teacher is
    pinned to the teacher's own identity (see :func:`teacher_variant`).
    """
    return _resolve_variant(cfg, name, ())


def _resolve_variant(cfg: ExperimentConfig, name: str | None,
                     students: tuple[str, ...]) -> ExperimentConfig:
    if name is None:
        if not cfg.variants:
            return cfg
        raise ConfigError(f"experiment '{cfg.name}' lists several variants; choose one with "
                          f"--variant: {_variant_listing(cfg)}")
    for spec in cfg.variants:
        if name == spec.name:
            data = to_dict(dataclasses.replace(cfg, variants=()))
            data = apply_overrides(data, spec.overrides)
            data["seed"] = spec.seed
            return _pin_teacher(cfg, config_from_dict(data), spec.name, students)
    by_id, why = _variants_by_id(cfg)
    if name in by_id:
        return by_id[name]
    known = [v.name for v in cfg.variants] or ["(no variants: omit --variant)"]
    raise ConfigError(f"experiment '{cfg.name}' has no variant '{name}'; known: {known}{why}")


def _variants_by_id(cfg: ExperimentConfig) -> tuple[dict[str, ExperimentConfig], str]:
    """``{variant_id: resolved variant}`` (the base config when there are no variants), and
    why it is empty when the ids cannot be computed (they need the data)."""
    try:
        if not cfg.variants:
            return {variant_id(cfg): cfg}, ""
        resolved = [resolve_variant(cfg, spec.name) for spec in cfg.variants]
        return {variant_id(r): r for r in resolved}, ""
    except DataError as err:
        return {}, f" (variant ids could not be matched: {err})"


def _variant_listing(cfg: ExperimentConfig) -> str:
    """``name (variant_id), ...``; the names alone when the data is not there to fingerprint."""
    try:
        return ", ".join(f"{v.name} ({variant_id(resolve_variant(cfg, v.name))})"
                         for v in cfg.variants)
    except DataError:
        return ", ".join(v.name for v in cfg.variants)


TEACHER_PREFIX = "variant:"


def teacher_variant(teacher: str | None) -> str | None:
    """The variant NAME a ``loss.distill.teacher`` of the form ``variant:NAME`` names (resolved
    variants hold ``variant:NAME@SETTINGS_ID``, plus ``+swa-HASH`` when the teacher's SWA
    average is meant), else None."""
    if teacher and teacher.startswith(TEACHER_PREFIX):
        return teacher[len(TEACHER_PREFIX):].split("@", 1)[0]
    return None


def teacher_pin(teacher: str) -> tuple[str | None, bool]:
    """``(the teacher's settings_id, whether its SWA average is meant)`` of a resolved
    ``variant:NAME@SETTINGS_ID[+swa-HASH]`` reference (``(None, False)`` before resolution)."""
    if "@" not in teacher:
        return None, False
    pin = teacher.split("@", 1)[1]
    return pin.split("+", 1)[0], "+swa-" in pin


def _pin_teacher(cfg: ExperimentConfig, student: ExperimentConfig, name: str,
                 students: tuple[str, ...]) -> ExperimentConfig:
    """``variant:NAME`` -> ``variant:NAME@<the teacher's settings_id>[+swa-<its swa section>]``:
    the student's variant_id then changes exactly when its teacher's settings do (and, through
    the student's own fingerprint, when the data they both read does)."""
    d = student.loss.distill
    teacher = teacher_variant(d.teacher)
    if not d.enabled or teacher is None:
        return student
    key = f"config key 'loss.distill.teacher' of variant '{name}'"
    chain = (*students, name)
    if teacher in chain:
        raise ConfigError(f"{key}: the teachers form a circle ({' -> '.join((*chain, teacher))}); "
                          f"a variant cannot learn from itself or from its own students")
    if teacher not in {v.name for v in cfg.variants}:
        raise ConfigError(f"{key}: '{d.teacher}' names no variant of experiment '{cfg.name}'; "
                          f"known: {[v.name for v in cfg.variants]}")
    model = _resolve_variant(cfg, teacher, chain)
    mine, theirs = (_architecture(c) for c in (student, model))
    if mine != theirs:
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        raise ConfigError(f"{key}: teacher '{teacher}' has another architecture (model keys "
                          f"{diff} differ); self-distillation needs the same model section")
    ref = f"{TEACHER_PREFIX}{teacher}@{settings_id(model)}"
    if cfg.pipeline.swa:
        ref += ids.swa_pin(to_dict(model.swa))
    return dataclasses.replace(student, loss=dataclasses.replace(
        student.loss, distill=dataclasses.replace(d, teacher=ref)))


def _architecture(cfg: ExperimentConfig) -> dict:
    values = to_dict(cfg.model)
    for key in (*_RUNTIME_KEYS["model"], "init_checkpoint", "drop_path_rate", "dropout",
                "dec_dropout"):
        values.pop(key, None)
    return values


def check_trainable(cfg: ExperimentConfig) -> None:
    """Rules across sections that a training run needs (single sections check themselves)."""
    d = cfg.loss.distill
    if d.enabled and teacher_variant(d.teacher) and not d.teacher_checkpoint:
        raise ConfigError(f"config key 'loss.distill.teacher': '{d.teacher}' is a variant whose "
                          f"checkpoint was not looked up; train the variant through its "
                          f"experiment (vspw-ray train EXPERIMENT.yaml --variant NAME or "
                          f"vspw-ray pipeline EXPERIMENT.yaml), not from a resolved config")
    if cfg.loss.logit_adjust.enabled and not cfg.loss.logit_adjust.prior:
        raise ConfigError("config key 'loss.logit_adjust.prior': logit adjustment is on but no "
                          "class prior is set; run `vspw-ray data stats ROOT --out DIR` and set "
                          "loss.logit_adjust.prior=DIR/class_prior.json")


def weight_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """What of ``cfg`` determines the trained weights besides the data: the data, model, loss
    and train sections (runtime-only keys left out), the seed, and the class prior by its
    content (its class frequencies), not by its path."""
    identity: dict[str, Any] = {"seed": cfg.seed}
    for section in _IDENTITY_SECTIONS:
        values = to_dict(getattr(cfg, section))
        for key in _RUNTIME_KEYS.get(section, ()):
            *outer, last = key.split(".")
            node = values
            for part in outer:
                node = node.get(part, {})
            node.pop(last, None)
        identity[section] = values
    la = cfg.loss.logit_adjust
    identity["loss"]["logit_adjust"]["prior"] = prior_digest(la.prior) if la.enabled else None
    return identity


def prior_digest(path: str | None) -> str | None:
    """A hash of a ``class_prior.json``'s class names and frequencies (the same prior at another
    path gives the same hash, a rewritten one another); ``"absent"`` while the file does not
    exist yet (the pipeline's data step writes it; training refuses to start without it)."""
    if path is None:
        return None
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except FileNotFoundError:
        return "absent"
    except (OSError, ValueError) as err:
        raise ConfigError(f"config key 'loss.logit_adjust.prior': cannot read {path}: {err}; "
                          f"recreate it with `vspw-ray data stats ROOT --out DIR`") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config key 'loss.logit_adjust.prior': {path} is not a class prior "
                          f"written by `vspw-ray data stats`")
    return ids.prior_id({"names": data.get("names"), "prior": data.get("prior")})


def settings_id(cfg: ExperimentConfig) -> str:
    """A short stable id of the settings that determine the trained weights, without the
    data (:func:`variant_id` adds the data's fingerprint). A ``variant:NAME`` teacher is pinned
    by it, so that a config resolves without the data present."""
    return ids.settings_id(cfg.model.family, weight_settings(cfg))


def variant_fingerprint(cfg: ExperimentConfig) -> str:
    """The fingerprint of the data a variant learns from and is selected on: the class table,
    the training split and the val split (:func:`vspw_ray.data.fingerprint.data_fingerprint`).

    Raises:
        DataError: ``data.root`` or a split of it is missing (the error names the key).
    """
    return data_fingerprint(cfg.data.root, (cfg.data.train_split, cfg.data.val_split))


def variant_id(cfg: ExperimentConfig, *, fingerprint: str | None = None) -> str:
    """A short stable hash of what determines the trained weights: the settings
    (:func:`settings_id`: data, model, loss and train sections, runtime keys left out, the
    seed) and the fingerprint of the data read (:func:`variant_fingerprint`, computed when not
    given). ``data.root`` stays out: a moved or copied dataset keeps its ids."""
    return ids.variant_id(cfg.model.family, weight_settings(cfg),
                          fingerprint or variant_fingerprint(cfg))
