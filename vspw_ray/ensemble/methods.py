"""The three ways of choosing the group weights on fold A, each returning a :class:`Selection`:
``grid`` (every grid point scored exactly in one pass over the store), ``greedy`` (forward
selection over single members on the pixel sample) and ``tune`` (Ray Tune + Optuna on the
pixel sample; :mod:`vspw_ray.ensemble.tune_search`). Every candidate (grid point, round,
trial) is also scored on fold B -- exactly for the grid, on a fold-B pixel sample otherwise --
so the selection-optimism check of the tune report applies to all three.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vspw_ray.config import ConfigError, EnsembleConfig
from vspw_ray.ensemble.grid import grid_axis, grid_search_store, make_grid, shard_videos
from vspw_ray.ensemble.sample import PixelSample, concat_samples, sample_miou, sample_store
from vspw_ray.metrics import mean_iou
from vspw_ray.tune.report import TrialRow, ranked

__all__ = ["SearchSpace", "Selection", "Heat", "weight_axis", "fold_samples", "sample_heat",
           "grid_method", "greedy_method", "check_search", "MAX_GRID_BYTES"]

MAX_GRID_BYTES = 4 << 30  # the grid's [P, C, C] int64 matrices, per fold


@dataclass(frozen=True)
class SearchSpace:
    """What every method searches over."""

    store: str
    root: str
    split: str
    fold_a: list[str]  # videos
    fold_b: list[str]
    groups: dict[str, list[str]]  # group -> member keys, the base group first
    members: list[str]  # every member key (greedy picks among them)
    ecfg: EnsembleConfig
    num_classes: int
    shards: int  # Ray tasks per pass

    @property
    def free(self) -> list[str]:
        """The groups whose weights are searched (all but the base)."""
        return list(self.groups)[1:]


@dataclass(frozen=True)
class Heat:
    """Fold-A mIoU over the first one or two free weights (the others at the chosen values)."""

    names: tuple[str, ...]  # (x,) or (x, y)
    axes: tuple[np.ndarray, ...]
    values: np.ndarray  # [nx] or [ny, nx]
    chosen: tuple[float, ...]
    fixed: dict[str, float]  # the other free weights, held at their chosen values
    source: str  # "grid (exact)" | "pixel sample (estimate)"


@dataclass(frozen=True)
class Selection:
    method: str
    groups: dict[str, list[str]]  # base group first (greedy: one group per chosen member)
    weights: dict[str, float]  # the free groups' weights
    rows: list[TrialRow]  # every candidate, val_a (what was maximised) and val_b
    heat: Heat | None = None
    stats: dict = field(default_factory=dict)


def weight_axis(ecfg: EnsembleConfig) -> np.ndarray:
    """``weight_range`` in ``grid_step`` steps, both ends included.

    Raises:
        ConfigError: the step does not divide the range (the last point would leave it).
    """
    lo, hi = ecfg.weight_range
    steps = (hi - lo) / ecfg.grid_step
    if abs(steps - round(steps)) > 1e-6:
        raise ConfigError(f"config key 'ensemble.grid_step': {ecfg.grid_step} does not divide "
                          f"ensemble.weight_range {lo}..{hi} (the grid would leave the range); "
                          f"choose a step such as {(hi - lo) / max(1, math.floor(steps)):g}")
    return grid_axis(lo, hi, ecfg.grid_step)


def fold_samples(space: SearchSpace, groups: dict[str, list[str]], box, map_fn
                 ) -> tuple[PixelSample, PixelSample]:
    """The stratified pixel samples of folds A and B (group scores of ``groups``), drawn by
    shards of videos in Ray tasks and joined in video order."""
    e = space.ecfg
    fn = functools.partial(sample_store, space.store, space.split, space.root, groups=groups,
                           base_group=next(iter(groups)), space=e.space, rate=e.sample_rate,
                           min_per_class=e.min_per_class, box=box, seed=e.seed)
    shards_a = shard_videos(space.fold_a, space.shards)
    parts = list(map_fn(fn, shards_a + shard_videos(space.fold_b, space.shards)))
    return concat_samples(parts[: len(shards_a)]), concat_samples(parts[len(shards_a):])


def _slice_points(names: Sequence[str], chosen: dict[str, float], axis: np.ndarray):
    """Weight points ``[P, K-1]`` over the first one or two free weights, the others held at
    ``chosen``; and the Heat's axes."""
    shown = list(names[:2])
    grid = make_grid([axis] * len(shown))
    points = np.array([[g[shown.index(n)] if n in shown else chosen[n] for n in names]
                       for g in grid], np.float64).reshape(len(grid), len(names))
    return points, tuple(axis for _ in shown)


def _heat(names, chosen, axes, values, source) -> Heat:
    shown = tuple(names[:2])
    shape = tuple(len(a) for a in axes)
    grid = np.asarray(values, np.float64).reshape(shape)
    return Heat(shown, axes, grid.T if len(shape) == 2 else grid,
                tuple(chosen[n] for n in shown),
                {n: chosen[n] for n in names if n not in shown}, source)


def sample_heat(sample: PixelSample, names: Sequence[str], chosen: dict[str, float],
                ecfg: EnsembleConfig) -> Heat:
    """The heatmap (or curve, one free weight) of the pixel sample's fold-A mIoU."""
    points, axes = _slice_points(names, chosen, weight_axis(ecfg))
    values = [sample_miou(sample, p) for p in points]
    return _heat(names, chosen, axes, values, "pixel sample (estimate)")


def _rows(names: Sequence[str], points, val_a, val_b) -> list[TrialRow]:
    return [TrialRow(number=i, tune_trial_id=None, state="complete",
                     params={n: float(w) for n, w in zip(names, p)}, iteration=None,
                     val_a=float(a), val_b=float(b), optuna_state="-")
            for i, (p, a, b) in enumerate(zip(points, val_a, val_b))]


def check_search(ecfg: EnsembleConfig, groups: int, num_classes: int) -> None:
    """Fail before any pass on a grid step that leaves the range or, for ``method: grid``, a
    grid whose ``[P, C, C]`` matrices would not fit in memory."""
    axis = weight_axis(ecfg)
    if ecfg.method != "grid":
        return
    points = len(axis) ** (groups - 1)
    size = points * num_classes ** 2 * 8
    if size > MAX_GRID_BYTES:
        raise ConfigError(f"config key 'ensemble.grid_step': {len(axis)}^{groups - 1} = "
                          f"{points} grid points of {num_classes}^2 confusion cells take "
                          f"{size / 2**30:.1f} GiB per fold; raise ensemble.grid_step or use "
                          f"ensemble.method=tune")


def grid_method(space: SearchSpace, map_fn: Callable) -> Selection:
    """Every point of the weight grid on all of fold A (and fold B) in one pass each."""
    check_search(space.ecfg, len(space.groups), space.num_classes)
    names, axis = space.free, weight_axis(space.ecfg)
    points = make_grid([axis] * len(names))
    start = time.perf_counter()
    folds = [grid_search_store(space.store, space.groups, space.split, videos, space.root,
                               points, space=space.ecfg.space, shards=space.shards,
                               map_fn=lambda fn, jobs: map_fn(fn, jobs))
             for videos in (space.fold_a, space.fold_b)]
    miou_a, miou_b = ([mean_iou(m) for m in f] for f in folds)
    rows = _rows(names, points, miou_a, miou_b)
    best = ranked(rows)[0]
    seconds = time.perf_counter() - start
    slice_points, axes = _slice_points(names, best.params, axis)
    index = {tuple(np.round(p, 10)): i for i, p in enumerate(points)}
    values = [miou_a[index[tuple(np.round(p, 10))]] for p in slice_points]
    return Selection("grid", space.groups, dict(best.params), rows,
                     _heat(names, best.params, axes, values, "grid (exact)"),
                     {"points": len(points), "seconds": seconds})


def _counts_miou(sample: PixelSample, counts: np.ndarray) -> float:
    """The sample's mIoU of the members' scores summed ``counts`` times each (the argmax of
    the weighted mean)."""
    from vspw_ray.ensemble.sample import weighted_confusion

    total = np.zeros(sample.scores.shape[1:], np.float64)
    for m in np.flatnonzero(counts):
        total += float(counts[m]) * sample.scores[m]
    matrix = weighted_confusion(sample.labels, total.argmax(-1), sample.weights,
                                sample.num_classes)
    return mean_iou(matrix + sample.fixed)


def _greedy_weights(members: Sequence[str], counts: np.ndarray
                    ) -> tuple[dict[str, list[str]], dict[str, float]]:
    """One group per chosen member, the most chosen (first among equals) as the base; each
    other member weighs its count over the base's."""
    base = int(np.argmax(counts))
    order = [base] + [m for m in np.flatnonzero(counts) if m != base]
    groups = {members[m]: [members[m]] for m in order}
    return groups, {members[m]: float(counts[m] / counts[base]) for m in order[1:]}


def greedy_method(space: SearchSpace, map_fn: Callable) -> Selection:
    """Forward selection with replacement over single members on the fold-A pixel sample.
    The candidates reported are the best-so-far ensembles after each round (checked on the
    fold-B sample); weights may leave ``weight_range``, which only bounds the group search."""
    from vspw_ray.ensemble.greedy import greedy_select

    start = time.perf_counter()
    singles = {m: [m] for m in space.members}
    a, b = fold_samples(space, singles, None, map_fn)
    rounds = space.ecfg.greedy_rounds
    counts, history = greedy_select(a.scores, a.labels, a.weights, rounds)
    seen, rows = [], []
    for r in range(1, rounds + 1):  # each round's best-so-far ensemble, once
        c, _ = greedy_select(a.scores, a.labels, a.weights, r) if r < rounds else (counts, None)
        if any(np.array_equal(c, s) for s in seen):
            continue
        seen.append(c)
        rows.append(TrialRow(number=r, tune_trial_id=None, state="complete",
                             params={m: int(n) for m, n in zip(space.members, c) if n},
                             iteration=r, val_a=float(max(history[:r])),
                             val_b=_counts_miou(b, c), optuna_state="-"))
    groups, weights = _greedy_weights(space.members, counts)
    return Selection("greedy", groups, weights, rows, None,
                     {"rounds": rounds, "history": [float(h) for h in history],
                      "counts": {m: int(n) for m, n in zip(space.members, counts)},
                      "sample_pixels_a": a.size, "seconds": time.perf_counter() - start})
