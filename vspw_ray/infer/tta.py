"""Test-time augmentation: horizontal flip x scales, averaging per-pixel class distributions
at the frame's original size (mmsegmentation's ``aug_test`` semantics)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vspw_ray.scores.encoding import scaled_size

__all__ = ["tta_probs", "scaled_size"]


@torch.no_grad()
def tta_probs(model, image: torch.Tensor, scales: Sequence[float] = (1.0,),
              flip: bool = False, autocast=None) -> torch.Tensor:
    """``image [1, 3, H, W]`` (normalised) -> ``[C, H, W]`` float32 class probabilities, the
    mean over scales (and flips) of ``model.predict`` resized back to ``H x W``.

    One view at a time, accumulated in place: memory is one full-size distribution plus the
    largest view, not one per view.
    """
    import contextlib

    autocast = autocast or contextlib.nullcontext()
    h, w = image.shape[-2:]
    total, views = None, 0
    for scale in scales:
        size = scaled_size(h, w, scale)
        view = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear",
                                                          align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            x = view.flip(-1) if flipped else view
            with autocast:
                probs = model.predict(x).float()
            if flipped:
                probs = probs.flip(-1)
            if probs.shape[-2:] != (h, w):
                probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
            total = probs[0] if total is None else total.add_(probs[0])
            views += 1
    return total.div_(views)
