"""From the rescored candidates to what the report states: each fit's choice on exact figures,
the fusion applied to test, and the honest figures -- out of fold under cross-fitting (on fold
A the fusion chosen on B, on fold B the one chosen on A), fold B under hold-out -- beside the
best single member and the plain mean, with per-video matrices for intervals over videos."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vspw_ray.ensemble.core.candidates import (
    DISAGREE,
    Candidate,
    Choice,
    choose,
    disagreement,
)
from vspw_ray.ensemble.core.rescore import Rescored

__all__ = ["Outcome", "decide", "VARIANTS"]

VARIANTS = ("ensemble", "single", "mean")  # the report's rows


@dataclass(frozen=True)
class Outcome:
    mode: str  # "crossfit" | "holdout"
    candidates: list[Candidate]
    choices: dict[str, Choice]  # fit -> choice
    applied: Candidate  # the fusion a submission applies
    single: Candidate  # the best single member on the applied fit's folds
    mean: Candidate
    folds: dict[str, list[str]]
    # variant -> fold ("A", "B") -> (confusion, VideoConsistency); "all" added under crossfit
    figures: dict[str, dict[str, tuple]]
    by_video: dict[str, dict[str, np.ndarray]]  # variant (and "applied") -> video -> confusion
    applied_figures: dict[str, tuple]  # fold -> (confusion, VC) of the applied fusion
    disagreement: float | None  # between the fusions chosen on A and on B (crossfit)

    @property
    def flagged(self) -> bool:
        return self.disagreement is not None and self.disagreement > DISAGREE

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)


def _merge(parts: Sequence[tuple]) -> tuple:
    from vspw_ray.ensemble.core.rescore import VC_WINDOWS
    from vspw_ray.metrics import VideoConsistency

    vc = VideoConsistency(VC_WINDOWS)
    for _, v in parts:
        vc.merge(VideoConsistency(VC_WINDOWS, {n: list(x) for n, x in v.accs.items()}))
    return sum(m for m, _ in parts), vc


def decide(candidates: Sequence[Candidate], rescored: Rescored, folds: Mapping[str, list[str]],
           fits: Sequence[str], mode: str) -> Outcome:
    """Choose per fit, pick the applied fusion (``all`` under crossfit, ``A`` under holdout) and
    gather the figures of the ensemble, the best single member and the plain mean."""
    folds = {f: list(v) for f, v in folds.items()}
    fold_mats = {c.name: {f: rescored.fold(c.name, folds[f])[0] for f in folds}
                 for c in candidates}
    choices = {fit: choose(candidates, fold_mats, fit) for fit in fits}
    applied_fit = "all" if mode == "crossfit" else "A"
    by_name = {c.name: c for c in candidates}
    singles = [c for c in candidates if c.kind == "single"]
    single = by_name[choose(singles, fold_mats, applied_fit).chosen]
    mean = next(c for c in candidates if c.kind == "mean")
    # the honest ensemble per fold: chosen without that fold's videos (holdout: A's choice)
    honest = ({"A": choices["B"].chosen, "B": choices["A"].chosen} if mode == "crossfit"
              else {"A": choices["A"].chosen, "B": choices["A"].chosen})
    figures = {"ensemble": {f: rescored.fold(honest[f], folds[f]) for f in ("A", "B")},
               "single": {f: rescored.fold(single.name, folds[f]) for f in ("A", "B")},
               "mean": {f: rescored.fold(mean.name, folds[f]) for f in ("A", "B")}}
    if mode == "crossfit":
        for v in VARIANTS:
            figures[v]["all"] = _merge([figures[v]["A"], figures[v]["B"]])
    by_video = {"ensemble": {v: rescored.matrix(honest[f], v) for f in ("A", "B")
                             for v in folds[f]}}
    applied = by_name[choices[applied_fit].chosen]
    for variant, cand in (("single", single), ("mean", mean), ("applied", applied)):
        by_video[variant] = rescored.by_video(cand.name, folds["A"] + folds["B"])
    gap = (disagreement(by_name[choices["A"].chosen], by_name[choices["B"].chosen])
           if mode == "crossfit" else None)
    return Outcome(mode, list(candidates), choices, applied, single, mean, folds, figures,
                   by_video, {f: rescored.fold(applied.name, folds[f]) for f in ("A", "B")}, gap)
