"""Greedy forward selection with replacement (Caruana et al., "Ensemble selection from
libraries of models", ICML 2004), as AutoGluon and auto-sklearn use it for tabular models: start
from nothing, and each round add the member -- possibly one already chosen -- whose addition
gives the best mIoU of the running mean of chosen members' scores. Selection with replacement
turns the counts into weights and keeps the ensemble from overfitting as fast as without.
"""

from __future__ import annotations

import numpy as np

from vspw_ray.ensemble.sample import weighted_confusion
from vspw_ray.metrics import mean_iou

__all__ = ["greedy_select"]


def greedy_select(member_scores: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                  rounds: int) -> tuple[np.ndarray, list[float]]:
    """Forward selection on a weighted pixel sample.

    Args:
        member_scores: ``[M, N, C]`` each member's scores of the sampled pixels.
        labels: ``[N]`` reduced ground-truth ids.
        weights: ``[N]`` pixel weights (see :mod:`vspw_ray.ensemble.sample`).
        rounds: members added, one per round.

    Returns:
        ``counts [M]``: how often each member was chosen up to the best round (the earliest
        round with the highest mIoU: the ensemble Caruana et al. keep), and the mIoU after
        every round. Members weigh ``counts / counts.sum()``; the argmax of the running sum
        equals that of the mean, so sums are compared. Ties go to the lower member index.
    """
    m, _, c = member_scores.shape
    if rounds < 1 or m < 1:
        raise ValueError(f"greedy selection needs rounds >= 1 and members, got {rounds} rounds "
                         f"and {m} members")
    total = np.zeros(member_scores.shape[1:], np.float64)
    chosen, history = [], []
    for _ in range(rounds):
        scores = [mean_iou(weighted_confusion(labels, (total + member_scores[j]).argmax(-1),
                                              weights, c)) for j in range(m)]
        best = int(np.argmax(scores))
        total += member_scores[best]
        chosen.append(best)
        history.append(float(scores[best]))
    keep = int(np.argmax(history)) + 1
    return np.bincount(chosen[:keep], minlength=m), history
