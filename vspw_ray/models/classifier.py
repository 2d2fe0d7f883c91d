"""Per-pixel classifiers: a plain 1x1 convolution, or the logit-adjusted cosine classifier.

Logit adjustment (seed section 3.1, Menon et al. 2021): the classifier's weights and the pixel
features are L2-normalised, their cosine is multiplied by a learnable scale, and a fixed
(non-trainable) bias ``tau * log(prior)`` is added during training only::

    logits_y = s * <w_y, f> / (||w_y|| ||f||) + tau * log(pi_y)

``predict`` uses only the learned part, which then compensates for the class imbalance the prior
explains. With ``tau = 0`` the layer is exactly the plain cosine classifier. The scale starts at
``init_scale`` (16 by default): cosines lie in [-1, 1] and need a temperature of that order for
softmax to become confident; it is learned from there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CosineClassifier", "build_classifier"]


class CosineClassifier(nn.Module):
    """``x [B, C_in, H, W] -> logits [B, K, H, W]`` (``K`` classes, or ``[B, N, K]`` for
    token inputs ``[B, N, C_in]`` with ``channels_last=True``)."""

    def __init__(self, in_channels: int, num_classes: int, *, prior: torch.Tensor | None = None,
                 tau: float = 0.0, init_scale: float = 16.0, channels_last: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_channels))
        nn.init.normal_(self.weight, std=0.01)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.tau = float(tau)
        self.channels_last = channels_last
        if prior is None:
            prior = torch.full((num_classes,), 1.0 / num_classes)
        prior = torch.as_tensor(prior, dtype=torch.float32)
        if prior.shape != (num_classes,) or not torch.all(prior > 0):
            raise ValueError(f"the class prior must hold {num_classes} positive values")
        self.register_buffer("log_prior", prior.log(), persistent=True)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, x: torch.Tensor, adjust: bool = False) -> torch.Tensor:
        w = F.normalize(self.weight, dim=1)
        if self.channels_last:
            logits = F.normalize(x, dim=-1) @ w.t()
            bias_shape = (1,) * (x.dim() - 1) + (-1,)
        else:
            logits = torch.einsum("bchw,kc->bkhw", F.normalize(x, dim=1), w)
            bias_shape = (1, -1, 1, 1)
        logits = self.scale * logits
        if adjust and self.tau != 0.0:
            logits = logits + self.tau * self.log_prior.view(bias_shape).to(logits.dtype)
        return logits


class _Conv1x1(nn.Conv2d):
    def forward(self, x: torch.Tensor, adjust: bool = False) -> torch.Tensor:  # noqa: ARG002
        return super().forward(x)


def build_classifier(in_channels: int, num_classes: int, *, logit_adjust: bool, prior=None,
                     tau: float = 0.0, init_scale: float = 16.0) -> nn.Module:
    if logit_adjust:
        return CosineClassifier(in_channels, num_classes, prior=prior, tau=tau,
                                init_scale=init_scale)
    return _Conv1x1(in_channels, num_classes, kernel_size=1)
