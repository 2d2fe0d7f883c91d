"""One-pass grid search of the group weights: every grid point's confusion matrix from a single
read and decode of the score store.

Why a pixel needs no per-point work when all corners of the weight box agree: the fused score of
class ``c`` at weights ``w`` is ``f_c(w) = s_0c + sum_j w_j s_jc``, linear in ``w``. So the
margin ``m(w) = f_c(w) - max_{d != c} f_d(w)`` is a minimum of linear functions, hence concave,
and over the box it is smallest at a corner. If ``c`` wins every corner by more than ``tol``,
it wins every point of the box (the set where ``c`` wins is an intersection of half-spaces,
i.e. convex, and holds the box's corners, hence their convex hull). ``tol`` covers float32
rounding (``16 (K + 1) eps`` times the chunk's largest ``|score|`` times
``1 + sum_j max|w_j|``, far above the ``(K + 1) eps / 2`` relative error of one fused value),
so such a pixel gets the same label at every point as a scorer that fuses and takes the
argmax point by point.

Contested pixels are scored point by point, but only over their *candidate* classes: with ``r``
the winner at one corner, ``f_d - f_r`` is linear too, so ``d`` can win somewhere in the box
only if ``f_d - f_r`` reaches ``-tol`` at some corner, which leaves a few classes per pixel.
That maximum over the corners is found without fusing at each: it is the value at the lowest
corner plus each weight's span times the positive part of ``s_jd - s_jr``.
Candidates are gathered in ascending class order so that ties resolve to the lower class id, as
a full argmax does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vspw_ray.data.layout import DataError, label_lut, list_frames, read_raw_mask, reduce_mask
from vspw_ray.ensemble.core.fusion import (
    fuse_into,
    fuse_points,
    group_means,
    group_order,
    score_bound,
)
from vspw_ray.parallel import map_videos
from vspw_ray.scores.encoding import decode
from vspw_ray.scores.store import ScoreStore

__all__ = ["grid_axis", "make_grid", "GridConfusions", "grid_confusions", "candidates",
           "gather_candidates", "point_labels", "group_frames", "argmax_rows", "EPS32",
           "GridJob", "run_grid_job", "shard_videos", "grid_search_store"]

CHUNK = 1 << 14  # pixels scored at once: a few [C, CHUNK] temporaries, mostly in cache
BUCKETS = (2, 3, 4, 6, 8, 16, 32)  # contested pixels by candidate count; more: all classes
BLOCK_VALUES = 1 << 22  # fused scores per block of grid points
BLOCK_BINS = 1 << 21  # confusion bins per block
EPS32 = float(np.finfo(np.float32).eps)


def grid_axis(low: float, high: float, step: float) -> np.ndarray:
    """``low, low + step, ..., high`` (``high`` included), rounded to 10 decimals."""
    if step <= 0 or high < low:
        raise ValueError(f"a grid axis needs step > 0 and high >= low, got {low}..{high} step {step}")
    n = int(round((high - low) / step)) + 1
    return np.round(low + step * np.arange(n), 10)


def make_grid(axes: Sequence[Sequence[float]]) -> np.ndarray:
    """The cartesian product of one axis per free weight: ``[P, K-1]`` float64, the first axis
    varying slowest."""
    return np.array(list(itertools.product(*axes)), dtype=np.float64).reshape(-1, len(axes))


@dataclass
class GridConfusions:
    """Per-point confusion matrices, kept as ``common`` (pixels with one label at every point,
    added once) plus ``contested`` ``[P, C, C]``; :meth:`total` sums them."""

    points: np.ndarray  # [P, K-1] weights of the non-base groups
    num_classes: int
    bound: float | None = None  # |score| at most (fusion.score_bound); None: measured per chunk
    common: np.ndarray = field(default=None)  # type: ignore[assignment]
    contested: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float64).reshape(len(self.points), -1)
        c = self.num_classes
        if self.common is None:
            self.common = np.zeros((c, c), np.int64)
        if self.contested is None:
            self.contested = np.zeros((len(self.points), c, c), np.int64)

    def total(self) -> np.ndarray:
        """``[P, C, C]`` int64, rows ground truth, columns prediction."""
        return self.contested + self.common[None]

    def add_frame(self, scores: Sequence, gt: np.ndarray) -> None:
        """Add one frame: ``scores`` the K group scores ``[C, H, W]`` (base group first; a
        ``[K, C, H, W]`` array or a list), ``gt [H, W]`` reduced ids with 255 ignored."""
        k, c = len(scores), self.num_classes
        if self.points.shape[1] != k - 1:
            raise ValueError(f"grid points have {self.points.shape[1]} weights but there are "
                             f"{k} groups (the base group's weight is fixed at 1)")
        flat = [np.asarray(s, dtype=np.float32).reshape(c, -1) for s in scores]
        gt = np.asarray(gt).ravel()
        if gt.size != flat[0].shape[1]:
            raise ValueError(f"ground truth has {gt.size} pixels, scores {flat[0].shape[1]}")
        labels = gt.astype(np.int64)
        for start in range(0, gt.size, CHUNK):  # slices, not a gather of the valid pixels
            end = start + CHUNK
            self._add_pixels([f[:, start:end] for f in flat], labels[start:end])

    def _add_pixels(self, s: list[np.ndarray], labels: np.ndarray) -> None:
        """``s``: K group scores ``[C, n]``, ``labels [n]`` (255 ignored)."""
        c = self.num_classes
        winner, reachable = candidates(s, self.points, self.bound)
        counts = np.add.reduce(reachable.view(np.uint8), axis=0, dtype=np.uint16)  # fast sum
        valid = labels != 255
        settled = valid & (counts == 1)  # only the winner itself can win
        self.common += _confusion(labels[settled], winner[settled], c)
        for pix, gathered, ids in _contested(s, reachable, counts, valid & (counts > 1)):
            self._score_points(gathered, ids, labels[pix])

    def _score_points(self, s: np.ndarray, ids: np.ndarray | None, labels: np.ndarray) -> None:
        """Fuse and take the argmax at every grid point: ``s [K, T, n]`` over the classes
        ``ids [T, n]`` (None: all classes in order). Counts go to the few (label, class) cells
        that occur, numbered compactly, from one bincount per block of points."""
        _, t, n = s.shape
        ids = np.broadcast_to(np.arange(t)[:, None], (t, n)) if ids is None else ids
        rows, row = np.unique(labels, return_inverse=True)
        cols, col = np.unique(ids, return_inverse=True)
        cell = row * len(cols) + col.reshape(t, n)  # [T, n] compact (label, class) cell
        cells = len(rows) * len(cols)
        block = max(1, min(BLOCK_VALUES // (t * n), BLOCK_BINS // cells))
        for start in range(0, len(self.points), block):
            points = self.points[start : start + block]
            best = argmax_rows(fuse_points(s, points))  # [Pb, n]
            index = np.take(cell, best * n + np.arange(n))
            index += (np.arange(len(points)) * cells)[:, None]
            counts = np.bincount(index.ravel(), minlength=len(points) * cells)
            self.contested[start : start + len(points), rows[:, None], cols] += \
                counts.reshape(-1, len(rows), len(cols))

    def merge(self, other: GridConfusions) -> GridConfusions:
        self.common += other.common
        self.contested += other.contested
        return self


def _contested(s: Sequence[np.ndarray], reachable: np.ndarray, counts: np.ndarray,
               where: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """``(pixels [n'], scores [K, T, n'], class ids [T, n'] or None for all classes)`` of the
    pixels ``where`` holds, bucketed by their candidate count so that pixels with few
    candidates are fused over few rows."""
    cont = np.flatnonzero(where)
    cand, counts = reachable[:, cont], counts[cont]
    done = 0
    for t in BUCKETS:
        sel = np.flatnonzero((counts > done) & (counts <= t))
        done = t
        if sel.size:
            ids = gather_candidates(cand[:, sel])
            pix = cont[sel]
            yield pix, np.stack([np.take_along_axis(sk[:, pix], ids, axis=0) for sk in s]), ids
    rest = cont[counts > done]
    if rest.size:
        yield rest, np.stack([sk[:, rest] for sk in s]), None


def point_labels(scores: Sequence[np.ndarray], points: np.ndarray,
                 bound: float | None = None) -> np.ndarray:
    """The fused label of every pixel at every point: K group scores ``[C, n]`` (base group
    first) and ``points [P, K-1]`` -> ``[P, n]`` uint8, bit for bit the argmax (first maximum)
    of :func:`fuse_arrays` at each point, from one corner pass per chunk of pixels and
    per-point fusion of the contested pixels' candidate classes only (``bound``: as for
    :func:`candidates`)."""
    points = np.asarray(points, np.float64).reshape(len(points), -1)
    n = scores[0].shape[1]
    out = np.empty((len(points), n), np.uint8)
    for start in range(0, n, CHUNK):
        s = [sk[:, start : start + CHUNK] for sk in scores]
        winner, reachable = candidates(s, points, bound)
        counts = np.add.reduce(reachable.view(np.uint8), axis=0, dtype=np.uint16)
        block = out[:, start : start + CHUNK]
        block[:] = winner
        for pix, gathered, ids in _contested(s, reachable, counts, counts > 1):
            best = argmax_rows(fuse_points(gathered, points))  # [P, n'] rows of gathered
            block[:, pix] = best if ids is None else np.take_along_axis(ids, best, axis=0)
    return out


def argmax_rows(f: np.ndarray) -> np.ndarray:
    """``f.argmax(-2)`` for ``[..., T, n]`` (first maximum wins), row by row: numpy's argmax
    over a leading axis copies and loops per column, many times slower."""
    if f.shape[-2] == 2:
        return (f[..., 1, :] > f[..., 0, :]).astype(np.intp)
    best = f[..., 0, :].copy()
    arg = np.zeros(best.shape, np.intp)
    for t in range(1, f.shape[-2]):
        np.copyto(arg, t, where=f[..., t, :] > best)
        np.maximum(best, f[..., t, :], out=best)
    return arg


def _corner_pass(s: Sequence[np.ndarray], points: np.ndarray, bound: float | None = None):
    """The winner ``r`` at the box's lowest corner ``[n]``, the rounding tolerance (a scalar)
    and each class's reach over ``r`` in the box around ``points``: ``max_box (f_d - f_r)``
    ``[C, n]``. ``f_d - f_r`` is linear in the weights, so its maximum is its value at the
    lowest corner plus, for each free weight, the weight's span times the positive part of
    ``s_jd - s_jr`` (the corner that maximises it, found per class without fusing at every
    corner); a class whose reach is below ``-tol`` loses to ``r`` everywhere in the box. A pixel
    where only ``r`` reaches ``-tol`` is uncontested: ``r`` wins every point by more than
    ``tol`` minus the rounding of this sum, a few ``eps`` of the same scale."""
    lo, hi = points.min(0), points.max(0)
    wmax = np.maximum(np.abs(lo), np.abs(hi)).sum()
    (c, n), cols = s[0].shape, np.arange(s[0].shape[1])
    largest = bound if bound is not None else (  # |score| at most: given, or measured
        max(max(abs(float(sk.max())), abs(float(sk.min()))) for sk in s) if n else 0.0)
    tol = np.float32(16 * (len(s) + 1) * EPS32 * (1.0 + wmax) * largest)
    reach, scratch = np.empty((c, n), np.float32), np.empty((c, n), np.float32)
    fuse_into(s, lo.tolist(), reach, scratch)
    winner = argmax_rows(reach)
    reach -= reach[winner, cols]
    for j, (low, high) in enumerate(zip(lo.tolist(), hi.tolist()), 1):
        span = np.float32(high) - np.float32(low)  # the weights are fused as float32
        if span == 0:
            continue
        np.subtract(s[j], s[j][winner, cols], out=scratch)
        np.maximum(scratch, 0, out=scratch)
        scratch *= span
        reach += scratch
    return winner, tol, reach


def candidates(s: Sequence[np.ndarray], points: np.ndarray,
               bound: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The classes of ``s`` (K group scores ``[C, n]``, a list or ``[K, C, n]``) that may win
    somewhere in the box spanned by ``points [P, K-1]``: ``(winner [n], mask [C, n])``,
    ``winner`` the label at one corner and always a candidate. A pixel with one candidate has
    that label at every point of the box. ``bound``: an upper bound of ``|score|`` that sets the
    rounding tolerance (:func:`~vspw_ray.ensemble.core.fusion.score_bound` of the space; None:
    measured on ``s``, two more passes over it)."""
    winner, tol, reach = _corner_pass(s, np.asarray(points, np.float64), bound)
    return winner, reach >= -tol


def gather_candidates(mask: np.ndarray) -> np.ndarray:
    """``[T, n]`` class ids of each pixel's candidates (``mask [C, n]``) in ascending order, the
    first of them repeated where a pixel has fewer than ``T = max count``: a repeated class
    never changes which class a first-maximum argmax picks."""
    t = int(mask.sum(0).max()) if mask.size else 1
    ids = np.argsort(~mask, axis=0, kind="stable")[:t]  # candidates first, ascending
    return np.where(np.arange(t)[:, None] < mask.sum(0), ids, ids[0])


def _confusion(labels: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray:
    return np.bincount(labels * c + pred, minlength=c * c).reshape(c, c)


def grid_confusions(frames: Iterable[tuple[Sequence, np.ndarray]], points: np.ndarray,
                    num_classes: int, *, raw: bool = True) -> np.ndarray:
    """Confusion matrices ``[P, C, C]`` of the fused prediction at every grid point.

    Args:
        frames: ``(scores, mask)`` per frame: the K group scores ``[C, H, W]`` (base group
            first) and the ground truth ``[H, W]``, raw VSPW ids (``raw=True``: 0 and 255
            ignored, ``1..C`` the classes) or reduced ids (255 ignored).
        points: ``[P, K-1]`` weights of the non-base groups.
    """
    acc = GridConfusions(points, num_classes)
    lut = label_lut(num_classes)
    for scores, mask in frames:
        acc.add_frame(scores, reduce_mask(np.asarray(mask), lut) if raw else mask)
    return acc.total()


class _Decoded(Mapping):
    """member -> probabilities ``[C, H, W]``, decoded on access, so a group mean holds one
    member's dense scores at a time."""

    def __init__(self, encoded: Mapping, num_classes: int, encodings: Mapping):
        self.encoded, self.num_classes, self.encodings = encoded, num_classes, encodings

    def __getitem__(self, member: str) -> torch.Tensor:
        return decode(self.encoded[member], self.num_classes, self.encodings[member])

    def __contains__(self, member: object) -> bool:  # Mapping's default would decode
        return member in self.encoded

    def __iter__(self):
        return iter(self.encoded)

    def __len__(self) -> int:
        return len(self.encoded)


def group_frames(store: str, split: str, root: str, videos: Sequence[str],
                 groups: Mapping[str, Sequence[str]], *, base_group: str | None = None,
                 space: str = "prob", batch_frames: int = 8
                 ) -> Iterator[tuple[str, str, list[np.ndarray], np.ndarray]]:
    """``(video, frame, group scores, raw mask)`` for every frame of ``videos``: each member's
    stored scores read and decoded once, at the frame's size; the group scores ``[C, H, W]``
    float32 in :func:`group_order`; the raw mask ``[H, W]`` as on disk."""

    order = group_order(groups, base_group or next(iter(groups)))
    members = list(dict.fromkeys(m for g in order for m in groups[g]))
    scores = ScoreStore(store)
    num_classes = _num_classes(scores, members)
    encodings = {m: scores.encoding(m) for m in members}
    frames: dict[str, dict] = {}
    for batch in scores.read_aligned(members, split, batch_frames=batch_frames, videos=videos):
        for i, (video, name) in enumerate(batch.keys):
            if video not in frames:
                frames = {video: {f.name: f for f in list_frames(root, video)}}
            if name not in frames[video]:
                raise DataError(f"stored {split} frame '{name}' of video '{video}' has no "
                                f"frame in {root}")
            lazy = _Decoded({m: batch.scores[m][i] for m in members}, num_classes, encodings)
            means = group_means(lazy, {g: groups[g] for g in order}, space)
            raw = read_raw_mask(frames[video][name])
            if raw.shape != tuple(means[order[0]].shape[1:]):
                raise DataError(f"stored scores of video '{video}' frame '{name}' are "
                                f"{tuple(means[order[0]].shape[1:])} but the mask is {raw.shape}")
            yield video, name, [means[g].numpy() for g in order], raw


def _num_classes(scores, members: Sequence[str]) -> int:
    counts = {m: int(scores.manifest(m)["num_classes"]) for m in members}
    if len(set(counts.values())) != 1:
        raise ValueError(f"members were stored with different class counts: {counts}")
    return next(iter(counts.values()))


@dataclass
class GridJob:
    """One shard of a store grid search: everything a worker process or Ray task needs."""

    store: str
    split: str
    root: str
    videos: list[str]
    groups: dict[str, list[str]]  # base group first
    points: np.ndarray  # [P, K-1]
    space: str = "prob"
    batch_frames: int = 8


def run_grid_job(job: GridJob) -> np.ndarray:
    """Confusion matrices ``[P, C, C]`` int64 of one shard's videos."""

    members = [m for ms in job.groups.values() for m in ms]
    acc = GridConfusions(job.points, _num_classes(ScoreStore(job.store), members),
                         score_bound(job.space))
    lut = label_lut(acc.num_classes)
    for video, name, scores, raw in group_frames(job.store, job.split, job.root, job.videos,
                                                 job.groups, space=job.space,
                                                 batch_frames=job.batch_frames):
        try:
            gt = reduce_mask(raw, lut)
        except DataError as err:
            raise DataError(f"video '{video}' frame '{name}': {err}") from None
        acc.add_frame(scores, gt)
    return acc.total()


def shard_videos(videos: Sequence[str], shards: int) -> list[list[str]]:
    """Contiguous, near-equal shards (no empty ones)."""
    n = max(1, min(shards, len(videos)))
    bounds = np.linspace(0, len(videos), n + 1).round().astype(int)
    return [list(videos[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def grid_search_store(store: str, groups: Mapping[str, Sequence[str]], split: str,
                      videos: Sequence[str], root: str, points: np.ndarray, *,
                      base_group: str | None = None, space: str = "prob", batch_frames: int = 8,
                      shards: int | None = None, processes: int | None = None,
                      map_fn: Callable[[Callable, list[GridJob]], Iterable[np.ndarray]] | None
                      = None) -> np.ndarray:
    """Confusion matrices ``[P, C, C]`` of every grid point over ``videos`` of a split, from one
    pass over the store. Videos are cut into ``shards`` (default: ``processes`` or the CPU
    count) run by ``map_fn(run_grid_job, jobs)`` -- by default worker processes through
    :func:`vspw_ray.parallel.map_videos`; a Ray caller passes one that runs each job as a task.
    ``points`` columns are the weights of ``group_order(groups, base_group)[1:]``."""
    import os

    if not videos:
        raise ValueError(f"no {split} videos to score")
    order = group_order(groups, base_group or next(iter(groups)))
    ordered = {g: list(groups[g]) for g in order}
    n = shards or processes or os.cpu_count() or 1
    jobs = [GridJob(str(store), split, str(root), shard, ordered, np.asarray(points, np.float64),
                    space, batch_frames) for shard in shard_videos(list(videos), n)]
    if map_fn is None:
        def map_fn(fn, js):
            return map_videos(fn, [(j,) for j in js], processes=processes)
    total = None
    for matrices in map_fn(run_grid_job, jobs):
        total = matrices if total is None else total + matrices
    return total
