"""Choosing among scored candidates, shared by the Tune sweep and the ensemble search: a trial's
row (its score on fold A of val, which chooses, and on fold B, which checks), the ranking, and
how much of the chosen one's lead survives on the fold that did not choose it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrialRow", "ranked", "selection_optimism", "CAVEAT"]

CAVEAT = ("Folds A and B are two halves of val (split by video): the best trial was chosen on A, "
          "so its lead on B shows how much of that lead was selection luck within val. It "
          "cannot detect a shift between val and test.")


@dataclass(frozen=True)
class TrialRow:
    number: int  # Optuna trial number
    tune_trial_id: str | None
    state: str  # complete | pruned | error
    params: dict[str, Any]
    iteration: int | None
    val_a: float | None  # tune.metric (measured on fold A of val)
    val_b: float | None  # its fold B counterpart
    optuna_state: str
    variant_id: str | None = None
    run_id: str | None = None
    extra: dict = field(default_factory=dict)


def ranked(rows: Sequence[TrialRow], mode: str = "max", fold: str = "A") -> list[TrialRow]:
    """The complete trials with a score on ``fold``, best first."""
    key = "val_a" if fold == "A" else "val_b"
    sign = 1.0 if mode == "max" else -1.0
    done = [r for r in rows if r.state == "complete" and getattr(r, key) is not None]
    return sorted(done, key=lambda r: -sign * getattr(r, key))


def selection_optimism(rows: Sequence[TrialRow], mode: str = "max") -> dict[str, Any]:
    """The best-on-A trial's lead over the runner-up on fold A against the same lead on fold B.

    ``holds``: the lead stays positive on B; ``shrinks``: it keeps less than half of its size.
    ``excess_gap``: the best trial's A-B gap minus the mean A-B gap of all complete trials (the
    part of its A score that looks like luck, after the folds' own difference).
    """
    from scipy.stats import spearmanr

    done = [r for r in ranked(rows, mode) if r.val_b is not None]
    out: dict[str, Any] = {"complete": len(done), "caveat": CAVEAT}
    if len(done) < 2:
        out["verdict"] = "needs at least two complete trials"
        return out
    sign = 1.0 if mode == "max" else -1.0
    best, runner = done[0], done[1]
    lead_a = sign * (best.val_a - runner.val_a)
    lead_b = sign * (best.val_b - runner.val_b)
    gaps = [r.val_a - r.val_b for r in done]
    out.update(
        best=best.number, runner_up=runner.number, lead_a=lead_a, lead_b=lead_b,
        best_rank_on_b=1 + sum(sign * r.val_b > sign * best.val_b for r in done),
        excess_gap=(best.val_a - best.val_b) - sum(gaps) / len(gaps),
        spearman_a_b=float(spearmanr([r.val_a for r in done], [r.val_b for r in done])[0])
        if len(done) > 2 else None,
    )
    if lead_b <= 0:
        out["verdict"] = "does not hold: the runner-up is as good or better on fold B"
    elif lead_b < 0.5 * lead_a:
        out["verdict"] = "shrinks: fold B keeps less than half of the lead"
    else:
        out["verdict"] = "holds"
    return out
