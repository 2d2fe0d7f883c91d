"""Pixel losses of the seed: OHEM cross-entropy and self-distillation.

OHEM follows mmsegmentation's ``OHEMPixelSampler`` semantics: pixels whose probability of their
ground-truth class is below ``thresh`` are kept, but never fewer than ``min_kept`` per image of
the batch -- the threshold rises to the ``min_kept * batch``-th smallest probability when fewer
pixels are below ``thresh``. Void pixels never count. **Difference from mmseg:** the loss is the
mean over *kept* pixels; mmseg multiplies the per-pixel loss by the 0/1 weight and divides by
all valid pixels, which shrinks the loss (and the effective learning rate) as fewer pixels are
kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255

__all__ = ["cross_entropy", "ohem_mask", "ohem_cross_entropy", "distill_kl", "IGNORE_INDEX"]


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE over valid pixels. ``logits [B, C, H, W]``, ``target [B, H, W]`` (255 ignored)."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / (target != IGNORE_INDEX).sum().clamp(min=1)


@torch.no_grad()
def ohem_mask(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """Boolean ``[B, H, W]``: the pixels OHEM keeps.

    Shapes stay static (no boolean indexing, no branch on the number of valid pixels), so the
    loss compiles into one graph: void pixels sort last with probability 2, and the index of the
    ``min_kept * B``-th smallest probability is clamped to the last valid one on the device.
    """
    valid = target != IGNORE_INDEX
    prob = logits.float().softmax(dim=1)
    gt_prob = prob.gather(1, target.clamp(max=logits.shape[1] - 1).masked_fill(~valid, 0)
                          .unsqueeze(1)).squeeze(1)
    ranked = gt_prob.masked_fill(~valid, 2.0).flatten().sort().values
    batch_kept = min_kept * target.shape[0]
    index = (valid.sum() - 1).clamp(min=0, max=min(batch_kept, ranked.numel() - 1))
    kth = ranked.index_select(0, index.view(1)).squeeze(0)
    # no valid pixel: kth is 2 and nothing is kept anyway
    threshold = torch.clamp(kth, min=thresh)
    return valid & (gt_prob < threshold)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, thresh: float = 0.7,
                       min_kept: int = 200_000) -> torch.Tensor:
    """CE averaged over the pixels :func:`ohem_mask` keeps (0 when none is kept)."""
    keep = ohem_mask(logits, target, thresh, min_kept)
    per_pixel = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    return (per_pixel * keep).sum() / keep.sum().clamp(min=1)


def distill_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor,
               valid: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` of temperature-softened per-pixel class distributions,
    averaged over valid pixels.

    Inputs are log-distributions ``[B, C, H, W]``; softening is ``softmax(log p / T)``, which for
    a softmax model equals ``softmax(logits / T)``. ``valid [B, H, W]`` bool.
    """
    s = F.log_softmax(student_log_probs.float() / temperature, dim=1)
    t = F.log_softmax(teacher_log_probs.float() / temperature, dim=1)
    kl = (t.exp() * (t - s)).sum(dim=1)
    return temperature**2 * (kl * valid).sum() / valid.sum().clamp(min=1)
