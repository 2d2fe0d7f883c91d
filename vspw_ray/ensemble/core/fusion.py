"""Hierarchical fusion: the mean of member scores inside each group, a weighted sum across groups
with the base group's weight fixed at 1, and the argmax.

``P = P_base + sum_j w_j P_j`` with ``P_g`` the mean of group ``g``'s member probabilities
(``space="prob"``, the seed's way) or the mean of their log-probabilities (``space="log"``: a
geometric mean, up to a per-pixel constant that does not change the argmax).

The weighted sum is always evaluated in float32 as ``((P_0 + w_1 * P_1) + w_2 * P_2) + ...``,
one rounded multiply and one rounded add per group, never fused into a matrix product or an FMA:
the one-pass grid (:mod:`vspw_ray.ensemble.core.grid`) relies on every scorer producing bit-identical
fused scores for the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vspw_ray.labels import class_labels

__all__ = ["SPACES", "MemberInfo", "auto_groups", "group_order", "group_means", "fuse",
           "fused_labels", "fuse_arrays", "fuse_into", "fuse_points", "LOG_FLOOR", "score_bound"]

SPACES = ("prob", "log")
# log-probabilities are floored so that a stored probability of exactly 0 (the decoded mass of
# classes outside a member's top-k can be 0) gives a finite score; weights times -inf would be NaN
LOG_FLOOR = 1e-12


def score_bound(space: str) -> float:
    """An upper bound of ``|score|`` of a member or group mean in ``space``: probabilities lie
    in [0, 1], floored log-probabilities in [log LOG_FLOOR, 0]."""
    return 1.0 if space == "prob" else -math.log(LOG_FLOOR)


@dataclass(frozen=True)
class MemberInfo:
    name: str  # variant name or id, as the score store keys it
    family: str  # model family, e.g. "maskformer" or "upernet"
    miou_a: float  # single-model mIoU on fold A, the grouping criterion


def auto_groups(members: Sequence[MemberInfo], strong: int, auxiliary: int) -> dict[str, list[str]]:
    """The seed's grouping: the family of the best single member on fold A is the base; its top
    ``strong`` members form ``"strong"`` (the base group) and the rest ``"weak"``; the other
    family's top ``auxiliary`` members form ``"aux"``. Empty groups are dropped; members rank by
    fold-A mIoU, ties by name. Returns ``{group: [member, ...]}`` with the base group first."""
    if not members:
        raise ValueError("auto_groups needs at least one member")
    if strong < 1 or auxiliary < 0:
        raise ValueError(f"ensemble.strong must be >= 1 and ensemble.auxiliary >= 0, got "
                         f"{strong} and {auxiliary}")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"members are listed more than once: {twice}")
    unknown = [m.name for m in members if not m.family]
    if unknown:
        raise ValueError(f"members {unknown} have no model family in their manifest; list "
                         f"ensemble.groups explicitly")
    families = sorted({m.family for m in members})
    if len(families) > 2:
        raise ValueError(f"automatic groups take two model families, got {families}; list "
                         f"ensemble.groups explicitly")
    ranked = sorted(members, key=lambda m: (-m.miou_a, m.name))
    base = ranked[0].family
    own = [m.name for m in ranked if m.family == base]
    other = [m.name for m in ranked if m.family != base]
    groups = {"strong": own[:strong], "weak": own[strong:], "aux": other[:auxiliary]}
    return {g: ms for g, ms in groups.items() if ms}


def group_order(groups: Mapping[str, Sequence[str]], base_group: str) -> list[str]:
    """The base group first, then the others in ``groups``' order: the order of the score stack
    ``[K, ...]``; the free weights (a grid point's columns) follow ``order[1:]``."""
    if base_group not in groups:
        raise ValueError(f"base group '{base_group}' is not among the groups {list(groups)}")
    return [base_group] + [g for g in groups if g != base_group]


def group_means(probs_by_member: Mapping[str, torch.Tensor], groups: Mapping[str, Sequence[str]],
                space: str = "prob") -> dict[str, torch.Tensor]:
    """Each group's mean score.

    Args:
        probs_by_member: member -> probabilities ``[C, H, W]`` (or any shape with classes
            first), each pixel summing to one.
        groups: group -> its members.
        space: ``"prob"``: mean of probabilities; ``"log"``: mean of log-probabilities.

    Returns:
        group -> float32 scores, the shape of the members' probabilities.
    """
    if space not in SPACES:
        raise ValueError(f"ensemble.space must be one of {SPACES}, got '{space}'")
    out = {}
    for group, members in groups.items():
        if not members:
            raise ValueError(f"group '{group}' has no members")
        missing = [m for m in members if m not in probs_by_member]
        if missing:
            raise ValueError(f"group '{group}' names members without scores: {missing}")
        total, owned = None, False  # owned: total is ours to add into, not a caller's tensor
        for m in members:
            p = probs_by_member[m]
            s = p.float().clamp_min(LOG_FLOOR).log() if space == "log" else p.float()
            if total is None:
                total, owned = s, s.data_ptr() != p.data_ptr()
            elif owned:
                total.add_(s)
            else:
                total, owned = total + s, True
        out[group] = total.div_(len(members)) if owned else total / len(members)
    return out


def _weight_list(weights: Mapping[str, float], order: Sequence[str]) -> list[float]:
    base, free = order[0], order[1:]
    if base in weights and float(weights[base]) != 1.0:
        raise ValueError(f"the base group '{base}' has its weight fixed at 1, got {weights[base]}")
    missing = [g for g in free if g not in weights]
    unknown = [g for g in weights if g not in order]
    if missing or unknown:
        raise ValueError(f"weights must name the groups {list(free)} (base '{base}' fixed at "
                         f"1); missing {missing}, unknown {unknown}")
    return [float(weights[g]) for g in free]


def fuse_arrays(scores, weights: Sequence[float]):
    """Group scores in stack order (``[K, ...]`` or a list of K arrays, base group first) and
    the K-1 free weights -> fused float32 scores ``[...]``, in the canonical order of the module
    docstring. Takes numpy arrays or torch tensors. The result may be ``scores[0]`` itself
    (all weights 0): copy before writing to it."""
    if len(weights) != len(scores) - 1:
        raise ValueError(f"{len(scores)} groups take {len(scores) - 1} weights, got {len(weights)}")
    numpy = isinstance(scores[0], np.ndarray)
    fused = scores[0]
    for j, w in enumerate(weights, 1):
        if w == 0:  # x + 0 * y == x for finite scores: skipping it changes no bit
            continue
        w32 = np.float32(w) if numpy else torch.tensor(w, dtype=torch.float32)
        fused = fused + w32 * scores[j]
    return fused


def fuse_into(scores: Sequence[np.ndarray], weights: Sequence[float], out: np.ndarray,
              scratch: np.ndarray) -> np.ndarray:
    """:func:`fuse_arrays` of numpy scores written into ``out`` (``scratch`` holds each
    product), bit for bit the same: no allocation in loops over many weight settings."""
    if len(weights) != len(scores) - 1:
        raise ValueError(f"{len(scores)} groups take {len(scores) - 1} weights, got {len(weights)}")
    first = True
    for j, w in enumerate(weights, 1):
        if w == 0:
            continue
        np.multiply(scores[j], np.float32(w), out=scratch)
        np.add(scores[0] if first else out, scratch, out=out)
        first = False
    if first:
        np.copyto(out, scores[0])
    return out


def fuse_points(scores, points: np.ndarray) -> np.ndarray:
    """:func:`fuse_arrays` at many weight points at once, bit for bit: numpy group scores
    ``[K, ...]`` and ``points [P, K-1]`` -> ``[P, ...]`` float32."""
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != len(scores) - 1:
        raise ValueError(f"{len(scores)} groups take points [P, {len(scores) - 1}], got "
                         f"{points.shape}")
    fused = np.broadcast_to(scores[0], (len(points), *scores[0].shape))
    extra = (None,) * scores[0].ndim
    for j in range(1, len(scores)):
        fused = fused + points[(slice(None), j - 1, *extra)] * scores[j]
    return fused if len(scores) > 1 else fused.copy()


def fuse(group_scores: Mapping[str, torch.Tensor], weights: Mapping[str, float],
         base_group: str) -> torch.Tensor:
    """``P_base + sum_g weights[g] * P_g`` over the other groups: ``[C, H, W]`` float32."""
    order = group_order(group_scores, base_group)
    return fuse_arrays([group_scores[g].float() for g in order], _weight_list(weights, order))


def fused_labels(group_scores: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                 base_group: str) -> np.ndarray:
    """The fused prediction ``[H, W]`` uint8: reduced class ids (ties go to the lower id)."""
    return class_labels(fuse(group_scores, weights, base_group), 0).numpy().astype(np.uint8)
