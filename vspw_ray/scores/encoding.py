"""The compact encoding of per-pixel class scores kept for the ensemble.

Dense fp16 scores of 124 classes at 853x480 are about 100 MB per frame and model. What the
ensemble needs is each member's class *distribution* where it matters, so a frame is stored as:

* the TTA-averaged probabilities pooled (area interpolation, which keeps each pixel summing to
  one) to ``scale`` of the frame's size;
* the ``top_k`` classes of each pooled pixel (uint8 ids) and their log-probabilities quantised
  to uint8 codes ``round(-log p / step)`` (log domain: a rare class at p = 1e-3 keeps ~3 %
  relative precision with step 1/32, where 8-bit linear probabilities would round it to zero;
  codes saturate at 255, i.e. p <= exp(-255 * step)).

Decoding scatters the top-k log-probabilities, spreads the remaining mass evenly over the other
classes, resizes the log-probabilities bilinearly to the frame's size and takes the softmax: the
way a segmentation head upsamples its stride-4 logits, so the decoded scores follow the dense
ones across region borders (interpolating probabilities instead shifts fused mIoU by ~0.5 point
at VSPW's size; ``benchmarks/ensemble_search.py``). Log-probabilities of the reconstruction are
logits up to a per-pixel constant. The measurements behind the defaults are in
``benchmarks/score_store.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

REST_FLOOR = 1e-12  # probability mass left for the classes outside the top k, at least
LOG_ZERO = -80.0  # log-probability of a class with no mass (exp underflows to 0 in float32)

__all__ = ["ScoreEncoding", "EncodedScores", "encode", "decode", "scaled_size"]


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(height, width)`` scaled by ``scale`` and rounded, at least 1 pixel each (the size of a
    TTA view and of the stored scores)."""
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


@dataclass(frozen=True)
class ScoreEncoding:
    scale: float = 0.25  # stored resolution relative to the frame
    top_k: int = 8
    step: float = 1 / 32  # nats per uint8 code

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, infer) -> ScoreEncoding:
        """The encoding an ``InferConfig`` asks for (``score_scale``, ``top_k``,
        ``score_step``)."""
        return cls(infer.score_scale, infer.top_k, infer.score_step)


@dataclass(frozen=True)
class EncodedScores:
    classes: np.ndarray  # [k, h, w] uint8 class ids, most probable first
    codes: np.ndarray  # [k, h, w] uint8, round(-log p / step)
    height: int  # the frame's size
    width: int


@torch.no_grad()
def encode(probs: torch.Tensor, enc: ScoreEncoding) -> EncodedScores:
    """``probs [C, H, W]`` (each pixel sums to one) -> :class:`EncodedScores`."""
    c, h, w = probs.shape
    if c > 256:
        raise ValueError(f"{c} classes do not fit uint8 class ids")
    pooled = probs.float()
    size = scaled_size(h, w, enc.scale)
    if size != (h, w):
        pooled = F.interpolate(pooled[None], size=size, mode="area")[0]
    k = min(enc.top_k, c)
    values, ids = pooled.topk(k, dim=0)
    codes = (-values.clamp_min(1e-38).log() / enc.step).round_().clamp_(0, 255)
    return EncodedScores(ids.to(torch.uint8).cpu().numpy(), codes.to(torch.uint8).cpu().numpy(),
                         h, w)


@torch.no_grad()
def decode(scores: EncodedScores, num_classes: int, enc: ScoreEncoding, *,
           full_size: bool = True, device: str | torch.device = "cpu") -> torch.Tensor:
    """Probabilities ``[C, H, W]`` (or at the stored resolution with ``full_size=False``)."""
    ids = torch.tensor(scores.classes, dtype=torch.long, device=device)
    log_k = torch.tensor(scores.codes, dtype=torch.float32, device=device) * -enc.step
    k = ids.shape[0]
    if num_classes > k:  # the mass left over, spread evenly over the other classes
        rest = (1.0 - log_k.exp().sum(0)).clamp_min(REST_FLOOR) / (num_classes - k)
        fill = rest.log()
    else:
        fill = torch.full_like(log_k[0], LOG_ZERO)
    logp = fill.unsqueeze(0).expand(num_classes, *fill.shape).clone()
    logp.scatter_(0, ids, log_k)
    if full_size and logp.shape[-2:] != (scores.height, scores.width):
        logp = F.interpolate(logp[None], size=(scores.height, scores.width), mode="bilinear",
                             align_corners=False)[0]
    return logp.softmax(0)
