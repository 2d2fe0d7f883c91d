"""The three ways of proposing fusions, each returning one :class:`Selection` per fit
(:data:`vspw_ray.ensemble.core.candidates.FITS`: chosen on A, on B, or on all of val): ``grid``
(every grid point scored exactly in one pass over the store per fold), ``greedy`` (ensemble
selection over single members on the pixel sample, optionally bagged) and ``tune`` (Ray Tune +
Optuna on the pixel sample, group weights and each member's share inside its group;
:mod:`vspw_ray.ensemble.tune_search`). Every candidate (grid point, round, trial) is also scored
on the other fold -- exactly for the grid, on that fold's pixel sample otherwise -- so the
selection-optimism check of the tune report applies to all three. A selection's ``top``
fusions become candidates of the final, exact choice (:mod:`vspw_ray.ensemble.core.candidates`).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vspw_ray.config import ConfigError, EnsembleConfig
from vspw_ray.ensemble.core.candidates import FITS, Candidate
from vspw_ray.ensemble.core.grid import grid_axis, grid_search_store, make_grid, shard_videos
from vspw_ray.ensemble.core.sample import (
    Hull,
    PixelSample,
    concat_samples,
    hull_miou,
    sample_miou,
    sample_store,
)
from vspw_ray.metrics import mean_iou
from vspw_ray.selection import TrialRow, ranked

__all__ = ["SearchSpace", "Selection", "Heat", "weight_axis", "fold_samples", "fit_samples",
           "sample_heat", "grid_method", "greedy_method", "check_search", "MAX_GRID_BYTES",
           "member_candidate"]

MAX_GRID_BYTES = 4 << 30  # the grid's [P, C, C] int64 matrices, per fold


@dataclass(frozen=True)
class SearchSpace:
    """What every method searches over."""

    store: str
    root: str
    split: str
    folds: dict[str, list[str]]  # "A" / "B" -> videos
    fits: tuple[str, ...]  # the fits to make (see candidates.fits_for)
    groups: dict[str, list[str]]  # group -> member keys, the base group first
    members: list[str]  # every member key, in the decode order (greedy picks among them)
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
    """One fit's search: every candidate it scored and its best few as fusions."""

    method: str
    fit: str  # "A" | "B" | "all"
    groups: dict[str, list[str]]  # base group first (greedy: one group per chosen member)
    weights: dict[str, float]  # the free groups' weights of its best point
    rows: list[TrialRow]  # every candidate: val_a what was maximised, val_b the other fold
    top: list[Candidate]  # its best few fusions, best first
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


def fold_samples(space: SearchSpace, groups: dict[str, list[str]], box, map_fn,
                 hull: Hull | None = None) -> dict[str, PixelSample]:
    """The stratified pixel samples of folds A and B (group scores of ``groups``), drawn by
    shards of videos in Ray tasks and joined in video order."""
    e = space.ecfg
    fn = functools.partial(sample_store, space.store, space.split, space.root, groups=groups,
                           base_group=next(iter(groups)), space=e.space, rate=e.sample_rate,
                           min_per_class=e.min_per_class, box=box, hull=hull, seed=e.seed)
    shards = {f: shard_videos(space.folds[f], space.shards) for f in ("A", "B")}
    parts = list(map_fn(fn, shards["A"] + shards["B"]))
    n = len(shards["A"])
    return {"A": concat_samples(parts[:n]), "B": concat_samples(parts[n:])}


def fit_samples(samples: dict[str, PixelSample], fit: str
                ) -> tuple[PixelSample, PixelSample | None]:
    """The sample a fit selects on (fold A, B, or both joined) and the one it is checked on."""
    folds, check = FITS[fit]
    chosen = samples[folds[0]] if len(folds) == 1 else concat_samples([samples[f] for f in folds])
    return chosen, samples[check] if check else None


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
                ecfg: EnsembleConfig, score: Callable | None = None) -> Heat:
    """The heatmap (or curve, one free weight) of the pixel sample's mIoU; ``score(sample,
    params)`` for samples that are not group-weight samples."""
    points, axes = _slice_points(names, chosen, weight_axis(ecfg))
    values = [score(sample, {**chosen, **dict(zip(names, p))}) if score else
              sample_miou(sample, p) for p in points]
    return _heat(names, chosen, axes, values, "pixel sample (estimate)")


def _rows(names: Sequence[str], points, val_a, val_b, fit: str) -> list[TrialRow]:
    return [TrialRow(number=i, tune_trial_id=None, state="complete",
                     params={n: float(w) for n, w in zip(names, p)}, iteration=None,
                     val_a=float(a), val_b=None if b is None else float(b), optuna_state="-",
                     extra={"fit": fit})
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


def _top(rows: list[TrialRow], n: int, make: Callable[[TrialRow], Candidate]) -> list[Candidate]:
    """The fusions of the ``n`` best rows, distinct, best first."""
    out, seen = [], set()
    for r in ranked(rows):
        c = make(r)
        if c.identity() not in seen:
            seen.add(c.identity())
            out.append(c)
        if len(out) == n:
            break
    return out


def grid_method(space: SearchSpace, map_fn: Callable) -> dict[str, Selection]:
    """Every point of the weight grid on all of fold A and of fold B, one pass each; a fit on
    both folds adds their matrices."""
    check_search(space.ecfg, len(space.groups), space.num_classes)
    names, axis = space.free, weight_axis(space.ecfg)
    points = make_grid([axis] * len(names))
    start = time.perf_counter()
    mats = {f: grid_search_store(space.store, space.groups, space.split, space.folds[f],
                                 space.root, points, space=space.ecfg.space, shards=space.shards,
                                 map_fn=lambda fn, jobs: map_fn(fn, jobs))
            for f in ("A", "B")}
    seconds = time.perf_counter() - start
    index = {tuple(np.round(p, 10)): i for i, p in enumerate(points)}
    out = {}
    for fit in space.fits:
        folds, check = FITS[fit]
        values = [mean_iou(m) for m in sum(mats[f] for f in folds)]
        checked = [mean_iou(m) for m in mats[check]] if check else [None] * len(points)
        rows = _rows(names, points, values, checked, fit)
        best = ranked(rows)[0]
        slice_points, axes = _slice_points(names, best.params, axis)
        heat = _heat(names, best.params, axes,
                     [values[index[tuple(np.round(p, 10))]] for p in slice_points],
                     "grid (exact)")
        top = _top(rows, space.ecfg.candidates, lambda r, fit=fit: Candidate(
            f"grid#{r.number}@{fit}", "searched", space.groups, dict(r.params), fit=fit))
        out[fit] = Selection("grid", fit, space.groups, dict(best.params), rows, top, heat,
                             {"points": len(points), "seconds": seconds})
    return out


def member_candidate(name: str, members: Sequence[str], weights: np.ndarray,
                     fit: str) -> Candidate:
    """A member-level fusion from member weights ``[M]`` (any positive scale): one group per
    member with weight above 0, the heaviest (first among equals) as the base, the others
    weighing theirs over the base's."""
    base = int(np.argmax(weights))
    order = [base] + [m for m in np.flatnonzero(weights > 0) if m != base]
    groups = {members[m]: [members[m]] for m in order}
    return Candidate(name, "searched", groups,
                     {members[m]: float(weights[m] / weights[base]) for m in order[1:]}, fit=fit)


def _greedy_fit(space: SearchSpace, sample: PixelSample, check: PixelSample | None,
                fit: str) -> Selection:
    from vspw_ray.ensemble.core.greedy import bagged_greedy, greedy_select

    e, members = space.ecfg, space.members
    init = min(e.greedy_init, len(members))
    counts, history = greedy_select(sample.scores, sample.labels, sample.weights,
                                    e.greedy_rounds, init=init)
    rows, seen = [], []
    for r in range(e.greedy_rounds + 1):  # each state's best-so-far ensemble, once
        c = counts if r == e.greedy_rounds else greedy_select(
            sample.scores, sample.labels, sample.weights, r, init=init)[0]
        if any(np.array_equal(c, s) for s in seen):
            continue
        seen.append(c)
        rows.append(_member_row(r, members, c, float(max(history[:r + 1])), check, fit))
    top = _top(rows, e.candidates, lambda r: member_candidate(
        f"greedy#{r.number}@{fit}", members, _weights(members, r.params), fit))
    stats = {"rounds": e.greedy_rounds, "init": init, "history": [float(h) for h in history],
             "counts": {m: int(n) for m, n in zip(members, counts)}, "sample_pixels": sample.size}
    if e.bags > 1:
        mean, bags = bagged_greedy(sample.scores, sample.labels, sample.weights, sample.videos,
                                   e.greedy_rounds, init=init, bags=e.bags, seed=e.seed)
        row = _member_row(len(rows) + 1000, members, mean, hull_miou(sample, mean), check,
                          fit, kind="bagged")
        rows.append(row)
        top = [member_candidate(f"bagged#{e.bags}@{fit}", members, mean, fit),
               *top[:e.candidates - 1]]
        stats["bags"] = [{m: int(n) for m, n in zip(members, b) if n} for b in bags]
    best = top[0]
    return Selection("greedy", fit, best.groups, best.weights, rows, top, None, stats)


def _weights(members: Sequence[str], params: dict) -> np.ndarray:
    return np.array([float(params.get(m, 0.0)) for m in members])


def _member_row(number: int, members, weights, value: float, check, fit: str,
                kind: str = "round") -> TrialRow:
    return TrialRow(number=number, tune_trial_id=None, state="complete",
                    params={m: float(w) for m, w in zip(members, weights) if w},
                    iteration=number, val_a=value,
                    val_b=hull_miou(check, np.asarray(weights, np.float64)) if check is not None else None,
                    optuna_state="-", extra={"fit": fit, "kind": kind})


def greedy_method(space: SearchSpace, map_fn: Callable) -> dict[str, Selection]:
    """Ensemble selection with replacement over single members on each fit's pixel sample
    (sorted initialisation, the earliest best state kept, ``bags`` bootstrap resamples of the
    videos averaged). Weights may leave ``weight_range``, which only bounds the group search."""
    start = time.perf_counter()
    samples = fold_samples(space, {m: [m] for m in space.members}, None, map_fn)
    out = {fit: _greedy_fit(space, *fit_samples(samples, fit), fit) for fit in space.fits}
    for sel in out.values():
        sel.stats["seconds"] = time.perf_counter() - start
    return out
