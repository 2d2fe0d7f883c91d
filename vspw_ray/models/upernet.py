"""Swin-UperNet: the standard Swin segmentation baseline (UperNet head + auxiliary FCN head).

UperNet (Xiao et al. 2018, as in mmsegmentation's ``UPerHead``): pyramid pooling (1, 2, 3, 6)
on the last stage, lateral 1x1 convs and a top-down FPN over all stages, 3x3 convs on each
level, every level upsampled to stride 4 and fused by a 3x3 conv. An auxiliary FCN head on
stage 3 adds ``aux_weight`` (0.4) times its loss during training. Norms are BatchNorm; the
trainer converts them to SyncBatchNorm for multi-GPU runs (SyncBatchNorm does not run on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vspw_ray.losses import cross_entropy, ohem_cross_entropy
from vspw_ray.models.backbone import SwinBackbone

__all__ = ["ConvBNReLU", "UperHead", "FCNHead", "SwinUperNet", "resize_to"]


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


def resize_to(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperHead(nn.Module):
    """``feats`` (4 maps, strides 4..32) -> fused features ``[B, channels, H/4, W/4]``."""

    def __init__(self, in_channels: list[int], channels: int = 512,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.pool_scales = pool_scales
        self.psp = nn.ModuleList(ConvBNReLU(in_channels[-1], channels, 1) for _ in pool_scales)
        self.psp_bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)

    def _psp(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [resize_to(conv(F.adaptive_avg_pool2d(x, s)), x.shape[-2:])
                      for s, conv in zip(self.pool_scales, self.psp)]
        return self.psp_bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats[:-1])] + [self._psp(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize_to(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([outs[0]] + [resize_to(o, size) for o in outs[1:]], 1))


class FCNHead(nn.Sequential):
    """Auxiliary head: 3x3 conv, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__(ConvBNReLU(in_channels, channels, 3), nn.Dropout2d(dropout),
                         nn.Conv2d(channels, num_classes, 1))


class SwinUperNet(nn.Module):
    """Swin backbone + UperNet decode head + auxiliary FCN head.

    The shared model interface:
      * ``forward(images, targets)`` -> dict of named loss terms (``loss_seg``, ``loss_aux``);
      * ``predict(images)`` -> per-pixel class distributions ``[B, C, H, W]`` at the input size
        (softmax of the learned logits; a logit-adjustment prior is never applied here);
      * ``log_probs(images)`` -> their logarithm, for self-distillation.
    """

    def __init__(self, backbone: SwinBackbone, num_classes: int, classifier: nn.Module, *,
                 channels: int = 512, pool_scales=(1, 2, 3, 6), aux_weight: float = 0.4,
                 aux_channels: int = 256, dropout: float = 0.1,
                 ohem: tuple[float, int] | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.decode_head = UperHead(backbone.channels, channels, tuple(pool_scales))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = classifier
        self.aux_weight = aux_weight
        self.aux_head = FCNHead(backbone.channels[2], aux_channels, num_classes, dropout) \
            if aux_weight > 0 else None
        self.ohem = ohem

    def _features(self, images: torch.Tensor):
        feats = self.backbone(images)
        return feats, self.dropout(self.decode_head(feats))

    @staticmethod
    def _to_input(logits: torch.Tensor, images: torch.Tensor, stride: int) -> torch.Tensor:
        """Upsample logits of the padded input (at ``stride``) and crop to the input size."""
        h, w = images.shape[-2:]
        full = resize_to(logits, (logits.shape[-2] * stride, logits.shape[-1] * stride))
        return full[..., :h, :w]

    def forward(self, images: torch.Tensor, targets: torch.Tensor,
                return_log_probs: bool = False):
        """``images [B, 3, H, W]``, ``targets [B, H, W]`` int64 (255 ignored)."""
        feats, fused = self._features(images)
        logits = self._to_input(self.classifier(fused, adjust=True), images, 4)
        if self.ohem is not None:
            thresh, min_kept = self.ohem
            losses = {"loss_seg": ohem_cross_entropy(logits, targets, thresh=thresh,
                                                     min_kept=min_kept)}
        else:
            losses = {"loss_seg": cross_entropy(logits, targets)}
        if self.aux_head is not None:
            aux = self._to_input(self.aux_head(feats[2]), images, 16)
            losses["loss_aux"] = self.aux_weight * cross_entropy(aux, targets)
        if not return_log_probs:
            return losses
        if getattr(self.classifier, "tau", 0.0):  # the learned part only, without the prior
            logits = self._to_input(self.classifier(fused, adjust=False), images, 4)
        return losses, F.log_softmax(logits.float(), dim=1)

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        _, fused = self._features(images)
        logits = self._to_input(self.classifier(fused, adjust=False), images, 4)
        return F.log_softmax(logits.float(), dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.log_probs(images).exp()
