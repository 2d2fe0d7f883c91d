"""Models behind one interface (see :class:`vspw_ray.models.upernet.SwinUperNet`).

``build_model(cfg, num_classes, prior)`` is the one place where config becomes constructor
arguments; every module can also be built directly in a test.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from vspw_ray.config import ExperimentConfig
from vspw_ray.models.backbone import SwinBackbone
from vspw_ray.models.classifier import build_classifier
from vspw_ray.models.distill import SelfDistillation
from vspw_ray.models.upernet import SwinUperNet

__all__ = ["build_model", "build_backbone", "SwinBackbone", "SwinUperNet", "SelfDistillation",
           "MODEL_BUILDERS"]


def build_backbone(cfg: ExperimentConfig) -> SwinBackbone:
    m = cfg.model
    return SwinBackbone(m.backbone, drop_path_rate=m.drop_path_rate, pretrained=m.pretrained,
                        **m.backbone_kwargs)


def _build_upernet(cfg: ExperimentConfig, num_classes: int, prior) -> nn.Module:
    m, la, ohem = cfg.model, cfg.loss.logit_adjust, cfg.loss.ohem
    classifier = build_classifier(m.channels, num_classes, logit_adjust=la.enabled, prior=prior,
                                  tau=la.tau, init_scale=la.init_scale)
    return SwinUperNet(build_backbone(cfg), num_classes, classifier, channels=m.channels,
                       pool_scales=m.pool_scales, aux_weight=m.aux_weight,
                       aux_channels=m.aux_channels, dropout=m.dropout,
                       ohem=(ohem.thresh, ohem.min_kept) if ohem.enabled else None)


def _build_maskformer(cfg: ExperimentConfig, num_classes: int, prior) -> nn.Module:
    from vspw_ray.models.maskformer import build_maskformer

    return build_maskformer(cfg, num_classes, prior, build_backbone(cfg))


MODEL_BUILDERS: dict[str, Callable[[ExperimentConfig, int, object], nn.Module]] = {
    "upernet": _build_upernet,
    "maskformer": _build_maskformer,
}


def build_model(cfg: ExperimentConfig, num_classes: int,
                prior: np.ndarray | torch.Tensor | None = None) -> nn.Module:
    """The model of ``cfg.model.family`` for ``num_classes`` classes.

    ``prior`` (class frequencies, from ``vspw-ray data stats``) is needed when logit adjustment
    is on. Self-distillation wraps the model with its frozen teacher; ``model.sync_bn`` converts
    BatchNorm to SyncBatchNorm for multi-GPU training.
    """
    if cfg.model.family not in MODEL_BUILDERS:
        raise ValueError(f"model.family '{cfg.model.family}' cannot be built by this version "
                         f"(available: {sorted(MODEL_BUILDERS)})")
    if cfg.loss.logit_adjust.enabled and prior is None:
        raise ValueError("loss.logit_adjust.enabled needs a class prior: set "
                         "loss.logit_adjust.prior to a class_prior.json from `vspw-ray data stats`")
    if prior is not None:
        prior = torch.as_tensor(np.asarray(prior), dtype=torch.float32)
    model = MODEL_BUILDERS[cfg.model.family](cfg, num_classes, prior)
    if cfg.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.loss.distill.enabled:
        d = cfg.loss.distill
        if d.teacher and d.teacher.startswith("variant:") and not d.teacher_checkpoint:
            raise ValueError(f"loss.distill.teacher '{d.teacher}' was not looked up: train the "
                             f"student through its experiment (vspw-ray train/pipeline)")
        teacher = MODEL_BUILDERS[cfg.model.family](cfg, num_classes, prior)
        model = SelfDistillation(model, teacher, weight=d.weight, temperature=d.temperature,
                                 teacher_checkpoint=d.teacher_checkpoint or d.teacher)
    return model
