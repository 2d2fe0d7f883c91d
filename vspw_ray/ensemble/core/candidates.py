"""The final choice among simple and searched fusions, on exact figures, and cross-fitting.

Whatever the method, its best few points are **candidates** beside every single member and
the plain mean of all members; all of them are rescored on every val pixel
(:mod:`vspw_ray.ensemble.core.rescore`) and the one with the best exact mIoU on the selecting
fold(s) wins, ties going to the candidate with fewer members (then to the earlier one: searched
points, singles, the mean). So the chosen fusion is never worse than the best single member on
the videos that chose it, as in nnU-Net's ``find_best_configuration``, which also scores every
single configuration beside the ensembles.

A **fit** is one choice: ``A`` (chosen on fold A, checked on B), ``B`` (the reverse) and
``all`` (chosen on all of val, what a submission applies). Cross-fitting reports the fusion
chosen on A scored on B and the one chosen on B scored on A: their summed confusion matrices
give an **out-of-fold** figure over all of val that no selection has seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vspw_ray.metrics import mean_iou

__all__ = ["FITS", "fits_for", "Candidate", "Choice", "single_candidates", "mean_candidate",
           "dedupe", "all_candidates", "choose", "disagreement", "DISAGREE"]

# fit -> (the folds that choose, the fold that checks it or None)
FITS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "A": (("A",), "B"), "B": (("B",), "A"), "all": (("A", "B"), None)}
DISAGREE = 0.25  # total-variation distance of two fits' member weights flagged as disagreeing


def fits_for(selection: str) -> tuple[str, ...]:
    """The fits a selection mode makes: ``holdout`` chooses on A only; ``crossfit`` on A, on B
    and on all of val."""
    if selection not in ("crossfit", "holdout"):
        raise ValueError(f"ensemble.selection must be crossfit or holdout, got '{selection}'")
    return ("A",) if selection == "holdout" else ("A", "B", "all")


@dataclass(frozen=True)
class Candidate:
    """One fusion the final choice may pick: groups (base first) averaged inside and weighted
    across (the base group at 1), optionally with unequal member shares inside groups."""

    name: str  # "grid#17@A", "single:upernet_s0", "mean"
    kind: str  # "searched" | "single" | "mean"
    groups: dict[str, list[str]]  # group -> member keys, the base group first
    weights: dict[str, float]  # the free groups' weights
    inner: dict[str, float] = field(default_factory=dict)  # member -> share in its group
    fit: str | None = None  # the fit whose search proposed it (searched points)

    def member_weights(self) -> dict[str, float]:
        """Each member's weight in the fused sum ``sum_m v_m P_m`` (members of a group share
        its weight; the base group's is 1): the fusion plan's own rule."""
        return self.plan("prob", 0).member_weights()

    @property
    def size(self) -> int:
        """Members that count (weight above 0)."""
        return sum(w > 0 for w in self.member_weights().values())

    def identity(self) -> tuple:
        """Equal for two candidates that fuse identically (the same groups, weights, shares)."""
        return (tuple((g, tuple(ms)) for g, ms in self.groups.items()),
                tuple(sorted((g, round(w, 10)) for g, w in self.weights.items())),
                tuple(sorted((m, round(w, 10)) for m, w in self.inner.items())))

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "groups": self.groups,
                "weights": self.weights, "inner": self.inner, "fit": self.fit,
                "members": self.size}

    def plan(self, space: str, num_classes: int, order: Sequence[str] = (),
             names: Mapping[str, str] | None = None):
        """The :class:`~vspw_ray.ensemble.core.rescore.FusionPlan` that labels frames with it."""
        from vspw_ray.ensemble.core.rescore import FusionPlan

        return FusionPlan(self.groups, tuple(float(self.weights[g]) for g in list(self.groups)[1:]),
                          space, num_classes, dict(self.inner), tuple(order), dict(names or {}))


def single_candidates(keys: Sequence[str], names: Mapping[str, str]) -> list[Candidate]:
    """Every member alone."""
    return [Candidate(f"single:{names.get(k, k)}", "single", {"single": [k]}, {}) for k in keys]


def mean_candidate(keys: Sequence[str],
                   groups: Mapping[str, Sequence[str]] | None = None) -> Candidate:
    """The plain mean of every member. With ``groups`` (base first) holding every member once,
    it is written as a point of their structure: the group means weighted by group size over
    the base group's, ``m_0 + sum_g (n_g / n_0) m_g = (N / n_0) x the plain mean`` (the same
    argmax), so it is labelled with the searched points of that structure in one pass."""
    grouped = [m for ms in (groups or {}).values() for m in ms]
    if len(groups or {}) < 2 or sorted(grouped) != sorted(keys):
        return Candidate("mean", "mean", {"mean": list(keys)}, {})
    sizes = {g: len(ms) for g, ms in groups.items()}
    base = next(iter(groups))
    return Candidate("mean", "mean", {g: list(ms) for g, ms in groups.items()},
                     {g: n / sizes[base] for g, n in sizes.items() if g != base})


def dedupe(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The first of each set of identical fusions, in order."""
    seen, out = set(), []
    for c in candidates:
        if c.identity() not in seen:
            seen.add(c.identity())
            out.append(c)
    return out


def all_candidates(searched: Sequence[Candidate], keys: Sequence[str],
                   names: Mapping[str, str],
                   groups: Mapping[str, Sequence[str]] | None = None) -> list[Candidate]:
    """The searched fits' best points, then every member alone, then the plain mean (a point
    of ``groups``' structure when they hold every member); each distinct fusion once, a
    searched point identical to a single member or the mean known by that simpler name."""
    simple = [*single_candidates(keys, names), mean_candidate(keys, groups)]
    known = {c.identity() for c in simple}
    return dedupe([*(c for c in searched if c.identity() not in known), *simple])


@dataclass(frozen=True)
class Choice:
    """The winner of one fit on exact figures."""

    fit: str
    chosen: str  # candidate name
    score: float  # its exact mIoU on the fit's selecting folds
    runner_up: str | None
    margin: float | None  # score minus the runner-up's
    ranking: tuple[tuple[str, float], ...]  # every candidate, best first

    def to_dict(self) -> dict:
        return {"fit": self.fit, "chosen": self.chosen, "score": self.score,
                "runner_up": self.runner_up, "margin": self.margin,
                "ranking": [list(r) for r in self.ranking]}


def choose(candidates: Sequence[Candidate], fold_matrices: Mapping[str, Mapping[str, np.ndarray]],
           fit: str) -> Choice:
    """The candidate with the best exact mIoU on ``fit``'s selecting folds; ties go to fewer
    members, then to the earlier candidate.

    Args:
        fold_matrices: candidate name -> fold (``"A"``/``"B"``) -> confusion matrix.
    """
    folds, _ = FITS[fit]
    scores = {c.name: mean_iou(sum(fold_matrices[c.name][f] for f in folds)) for c in candidates}
    order = sorted(range(len(candidates)), key=lambda i: (
        -np.nan_to_num(scores[candidates[i].name], nan=-1.0), candidates[i].size, i))
    ranking = tuple((candidates[i].name, float(scores[candidates[i].name])) for i in order)
    runner = ranking[1] if len(ranking) > 1 else None
    return Choice(fit, ranking[0][0], ranking[0][1], runner[0] if runner else None,
                  ranking[0][1] - runner[1] if runner else None, ranking)


def disagreement(a: Candidate, b: Candidate) -> float:
    """Total-variation distance between two fusions' member weights, each normalised to sum
    to 1: 0 for the same fusion, 1 for fusions of disjoint members."""
    wa, wb = a.member_weights(), b.member_weights()
    sa, sb = sum(wa.values()) or 1.0, sum(wb.values()) or 1.0
    keys = set(wa) | set(wb)
    return 0.5 * sum(abs(wa.get(k, 0.0) / sa - wb.get(k, 0.0) / sb) for k in keys)
