"""A stratified, weighted pixel sample of fold A on which one weight setting scores in
milliseconds.

Per frame, the valid pixels of each ground-truth class form a stratum; a stratum of ``n``
pixels keeps ``m = min(n, max(min_per_class, ceil(rate * n)))`` of them, drawn without
replacement, each weighted ``n / m`` (one over its sampling rate). Weighted confusion counts
are then unbiased estimates of the full ones, and a class that is rare in a frame keeps pixels
instead of vanishing from the sample. Draws come from ``(seed, video, frame)``, so the sample
does not depend on how videos are sharded or ordered.

With a weight ``box`` (the search range), pixels whose fused label is the same everywhere in
the box (see :mod:`vspw_ray.ensemble.core.grid`) are not sampled at all: their exact confusion counts
go into ``fixed``, and only the contested pixels -- the only ones whose label the weights can
change -- are sampled. The estimate's variance then comes from those pixels alone, so a higher
``rate`` on them costs fewer stored pixels than a plain sample of the same accuracy. A sampled
pixel also keeps only the scores of its candidate classes (those that can win somewhere in the
box, usually 2-4 of them), so a weight setting scores over a few columns instead of all C.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from vspw_ray.ensemble.core.fusion import fuse_arrays
from vspw_ray.ensemble.core.grid import CHUNK, EPS32, argmax_rows, candidates, gather_candidates
from vspw_ray.metrics import mean_iou

__all__ = ["PixelSample", "Hull", "normalise_inner", "frame_rng", "stratified_indices",
           "sample_frame", "concat_samples", "sample_store", "weighted_confusion", "sample_miou",
           "hull_candidates", "hull_miou", "video_id"]


def normalise_inner(raw: Sequence[float]) -> np.ndarray:
    """A group's raw inner weights (each >= 0) as shares summing to 1; all zero: equal shares
    (the plain group mean)."""
    raw = np.asarray(raw, np.float64)
    if (raw < 0).any():
        raise ValueError(f"inner weights must be >= 0, got {raw.tolist()}")
    total = raw.sum()
    return raw / total if total > 0 else np.full(len(raw), 1.0 / len(raw))


@dataclass(frozen=True)
class Hull:
    """The member weights a search over group weights in ``[low, high]`` *and* each member's
    weight inside its group can reach: ``v_m = u_m`` in the base group and ``v_m = w_g u_m`` in
    a free group ``g``, each group's ``u`` on its simplex. Each single member of the base group,
    the base group's mean and the seed's ``S + a W + b A`` points lie in it."""

    groups: tuple[tuple[int, ...], ...]  # member positions in the score stack, base group first
    low: float
    high: float

    @property
    def size(self) -> int:
        return sum(len(g) for g in self.groups)

    def member_weights(self, group_weights: Sequence[float],
                       inner: Sequence[Sequence[float]]) -> np.ndarray:
        """``[M]`` member weights from the free groups' weights and each group's raw inner
        weights (normalised by :func:`normalise_inner`)."""
        if len(group_weights) != len(self.groups) - 1 or len(inner) != len(self.groups):
            raise ValueError(f"{len(self.groups)} groups take {len(self.groups) - 1} group "
                             f"weights and {len(self.groups)} inner weight lists")
        v = np.zeros(self.size, np.float64)
        for g, (members, raw) in enumerate(zip(self.groups, inner)):
            w = 1.0 if g == 0 else float(group_weights[g - 1])
            v[list(members)] = w * normalise_inner(raw)
        return v

    def check(self, v: np.ndarray) -> None:
        """Raises ValueError when ``v`` lies outside the hull (its settled pixels hold only
        inside it)."""
        sums = [float(np.sum(v[list(g)])) for g in self.groups]
        ok = (v >= -1e-9).all() and abs(sums[0] - 1) <= 1e-6 and all(
            self.low - 1e-6 <= s <= self.high + 1e-6 for s in sums[1:])
        if not ok:
            raise ValueError(f"member weights {np.round(v, 4).tolist()} lie outside the "
                             f"sample's hull (group sums {np.round(sums, 4).tolist()}, base 1, "
                             f"others in [{self.low}, {self.high}])")


def hull_candidates(s: Sequence[np.ndarray], hull: Hull) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`vspw_ray.ensemble.core.grid.candidates` for member scores ``s`` (M ``[C, n]``)
    over a :class:`Hull`: ``(winner [n], mask [C, n])``. ``f_d - f_r`` is linear in the member
    weights and the hull is a product of one set per group, so its largest value over the hull
    is a sum over groups of the largest over each group's vertices: ``max_m delta_m`` for the
    base group, ``max(low, high) * max_m delta_m`` (by sign) for a free one -- no enumeration
    of the hull's vertices."""
    c, n = s[0].shape
    ref = hull.member_weights([hull.low] * (len(hull.groups) - 1),
                              [[1.0] * len(g) for g in hull.groups])
    fused = np.zeros((c, n), np.float32)
    for m, w in enumerate(ref):
        if w:
            fused += np.float32(w) * s[m]
    winner, cols = argmax_rows(fused), np.arange(n)
    reach = np.zeros((c, n), np.float32)
    for g, members in enumerate(hull.groups):
        top = np.full((c, n), -np.inf, np.float32)
        for m in members:
            np.maximum(top, s[m] - s[m][winner, cols], out=top)
        if g == 0:
            reach += top
        else:
            reach += np.where(top > 0, np.float32(hull.high) * top, np.float32(hull.low) * top)
    largest = max(float(np.abs(sm).max()) for sm in s) if n else 0.0
    wsum = 1.0 + hull.high * (len(hull.groups) - 1)
    tol = np.float32(16 * (len(s) + 1) * EPS32 * wsum * largest)
    return winner, reach >= -tol


def video_id(video: str) -> int:
    """A video's id in a sample: stable across shards and processes."""
    return zlib.crc32(video.encode())


@dataclass(frozen=True)
class PixelSample:
    scores: np.ndarray  # [K, N, T] group (or member) scores, base group first; fp16 or fp32
    labels: np.ndarray  # [N] int64 reduced ground-truth ids
    weights: np.ndarray  # [N] float64, 1 / the stratum's sampling rate
    num_classes: int
    fixed: np.ndarray  # [C, C] float64 exact counts of the pixels settled over the box
    box: np.ndarray | None = None  # [K-1, 2] (low, high) per free weight; None: no settling
    classes: np.ndarray | None = None  # [N, T] class of each score column; None: T = C, in order
    hull: Hull | None = None  # member scores settled over a hull (instead of a box)
    videos: np.ndarray | None = None  # [N] int64 video id (video_id) of each pixel

    @property
    def size(self) -> int:
        return int(self.labels.size)


def frame_rng(seed: int, video: str, frame: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(f"{video}/{frame}".encode())])


def stratified_indices(gt: np.ndarray, rate: float, min_per_class: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sampled flat pixel indices (ascending) of ``gt [H, W]`` (reduced ids, 255 ignored) and
    their weights ``n / m`` of their class stratum."""
    if not 0 < rate <= 1 or min_per_class < 1:
        raise ValueError(f"sample rate must be in (0, 1] and min_per_class >= 1, got {rate} "
                         f"and {min_per_class}")
    flat = np.asarray(gt).ravel()
    picks, weights = [], []
    for c in np.unique(flat):
        if c == 255:
            continue
        where = np.flatnonzero(flat == c)
        m = min(where.size, max(min_per_class, math.ceil(rate * where.size)))
        picks.append(rng.choice(where, size=m, replace=False))
        weights.append(np.full(m, where.size / m))
    if not picks:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    idx, w = np.concatenate(picks), np.concatenate(weights)
    order = np.argsort(idx)
    return idx[order], w[order]


def _settle(flat: list[np.ndarray], gt: np.ndarray, settle: Callable
            ) -> tuple[np.ndarray, np.ndarray]:
    """Exact confusion counts of the valid pixels that ``settle`` (scores -> ``(winner,
    candidate mask)``) finds settled, and ``gt`` with them set to 255 so that only contested
    pixels are sampled."""
    c = flat[0].shape[0]
    fixed, gt = np.zeros((c, c), np.float64), gt.copy()
    for start in range(0, gt.size, CHUNK):
        end = start + CHUNK
        label, mask = settle([f[:, start:end] for f in flat])
        ok = np.flatnonzero((mask.sum(0) == 1) & (gt[start:end] != 255)) + start
        fixed += np.bincount(gt[ok].astype(np.int64) * c + label[ok - start],
                             minlength=c * c).reshape(c, c)
        gt[ok] = 255
    return gt, fixed


def sample_frame(scores: Sequence, gt: np.ndarray, *, rate: float, min_per_class: int,
                 rng: np.random.Generator, box: Sequence[tuple[float, float]] | None = None,
                 hull: Hull | None = None, dtype=np.float32) -> PixelSample:
    """The sample of one frame: ``scores`` the K group scores ``[C, H, W]`` (base group
    first), ``gt [H, W]`` reduced ids (255 ignored); ``box``: ``(low, high)`` of each free
    weight, to settle the uncontested pixels exactly and keep only candidate classes (see the
    module docstring); or ``hull``: ``scores`` are member scores, settled over the hull."""
    c = np.asarray(scores[0]).shape[0]
    flat = [np.asarray(s, dtype=np.float32).reshape(c, -1) for s in scores]
    gt = np.asarray(gt).ravel()
    if box is None and hull is None:
        idx, weights = stratified_indices(gt, rate, min_per_class, rng)
        picked = np.stack([f[:, idx].T for f in flat]).astype(dtype)
        return PixelSample(picked, gt[idx].astype(np.int64), weights, c, np.zeros((c, c)))
    box_arr = None if box is None else np.asarray(box, np.float64).reshape(len(flat) - 1, 2)

    def settle(s):
        return hull_candidates(s, hull) if hull is not None else candidates(s, box_arr.T)

    contested, fixed = _settle(flat, gt, settle)
    idx, weights = stratified_indices(contested, rate, min_per_class, rng)
    picked = np.stack([f[:, idx] for f in flat])  # [K, C, m]
    ids = gather_candidates(settle(picked)[1])  # [T, m]
    kept = np.stack([np.take_along_axis(p, ids, axis=0).T for p in picked]).astype(dtype)
    return PixelSample(kept, gt[idx].astype(np.int64), weights, c, fixed, box_arr,
                       np.ascontiguousarray(ids.T), hull)


def _pad_columns(sample: PixelSample, t: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores and classes widened to ``t`` columns by repeating the first (harmless: a repeated
    class never changes a first-maximum argmax)."""
    extra = t - sample.scores.shape[2]
    if sample.classes is None or extra == 0:
        return sample.scores, sample.classes
    scores = np.concatenate([sample.scores, np.repeat(sample.scores[:, :, :1], extra, 2)], 2)
    return scores, np.concatenate([sample.classes, np.repeat(sample.classes[:, :1], extra, 1)], 1)


def concat_samples(samples: Sequence[PixelSample]) -> PixelSample:
    if not samples:
        raise ValueError("no frames to sample")
    first = samples[0]
    if any((s.box is None) != (first.box is None) or s.hull != first.hull or
           (s.box is not None and not np.array_equal(s.box, first.box)) for s in samples):
        raise ValueError("samples taken with different weight boxes cannot be joined")
    t = max(s.scores.shape[2] for s in samples)
    padded = [_pad_columns(s, t) for s in samples]
    classes = None if first.classes is None else np.concatenate([p[1] for p in padded])
    videos = None if any(s.videos is None for s in samples) else np.concatenate(
        [s.videos for s in samples])
    return PixelSample(np.concatenate([p[0] for p in padded], axis=1),
                       np.concatenate([s.labels for s in samples]),
                       np.concatenate([s.weights for s in samples]), first.num_classes,
                       sum(s.fixed for s in samples), first.box, classes, first.hull, videos)


def sample_store(store: str, split: str, root: str, videos: Sequence[str],
                 groups: Mapping[str, Sequence[str]], *, base_group: str | None = None,
                 space: str = "prob", rate: float = 0.03, min_per_class: int = 16,
                 box: Sequence[tuple[float, float]] | None = None, hull: Hull | None = None,
                 seed: int = 0, dtype=np.float16, batch_frames: int = 8) -> PixelSample:
    """The pixel sample of ``videos`` from the score store, group scores formed as the grid
    forms them, at full resolution; each pixel tagged with its :func:`video_id`. For greedy
    selection pass one group per member (``{m: [m] for m in members}``) and no box; for a
    search inside groups, one group per member and a ``hull``. Call per shard of videos and
    :func:`concat_samples` the results to spread the work."""
    from vspw_ray.data.layout import label_lut, reduce_mask
    from vspw_ray.ensemble.core.grid import group_frames

    parts, lut = [], None
    for video, frame, scores, raw in group_frames(store, split, root, videos, groups,
                                                  base_group=base_group, space=space,
                                                  batch_frames=batch_frames):
        lut = label_lut(scores[0].shape[0]) if lut is None else lut
        part = sample_frame(scores, reduce_mask(raw, lut), rate=rate,
                            min_per_class=min_per_class, box=box, hull=hull,
                            rng=frame_rng(seed, video, frame), dtype=dtype)
        parts.append(replace(part, videos=np.full(part.size, video_id(video), np.int64)))
    return concat_samples(parts)


def weighted_confusion(labels: np.ndarray, preds: np.ndarray, weights: np.ndarray,
                       num_classes: int) -> np.ndarray:
    """``[C, C]`` float64 confusion matrix (rows ground truth) with per-pixel weights."""
    c = num_classes
    return np.bincount(labels * c + preds, weights=weights, minlength=c * c).reshape(c, c)


def sample_miou(sample: PixelSample, weights: Sequence[float]) -> float:
    """Estimated mIoU of the fusion with the K-1 free ``weights`` (base group at 1)."""
    if sample.box is not None:
        w = np.asarray(weights, np.float64)
        if w.shape != (len(sample.box),) or (w < sample.box[:, 0]).any() or \
                (w > sample.box[:, 1]).any():
            raise ValueError(f"weights {w.tolist()} lie outside the sample's box "
                             f"{sample.box.tolist()}: its settled pixels hold only inside it")
    best = fuse_arrays(sample.scores, weights).argmax(-1)  # float16 scores fuse in float32
    preds = best if sample.classes is None else np.take_along_axis(
        sample.classes, best[:, None], axis=1)[:, 0]
    matrix = weighted_confusion(sample.labels, preds, sample.weights, sample.num_classes)
    return mean_iou(matrix + sample.fixed)


def hull_miou(sample: PixelSample, member_weights: Sequence[float]) -> float:
    """Estimated mIoU of the fusion ``sum_m v_m P_m`` of a member-score sample (``v`` inside
    its hull when it has one)."""
    v = np.asarray(member_weights, np.float64)
    if v.shape != (sample.scores.shape[0],):
        raise ValueError(f"{sample.scores.shape[0]} members take {sample.scores.shape[0]} "
                         f"weights, got {v.shape}")
    if sample.hull is not None:
        sample.hull.check(v)
    fused = np.zeros(sample.scores.shape[1:], np.float32)
    for m in np.flatnonzero(v):
        fused += np.float32(v[m]) * sample.scores[m]
    best = fused.argmax(-1)
    preds = best if sample.classes is None else np.take_along_axis(
        sample.classes, best[:, None], axis=1)[:, 0]
    matrix = weighted_confusion(sample.labels, preds, sample.weights, sample.num_classes)
    return mean_iou(matrix + sample.fixed)
