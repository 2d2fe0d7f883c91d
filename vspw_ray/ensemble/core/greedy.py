"""Greedy ensemble selection (Caruana et al., "Ensemble selection from libraries of models",
ICML 2004), as AutoGluon and auto-sklearn practise it for tabular models:

* **sorted initialisation**: the ``init`` best single members on the sample form the start;
* **selection with replacement**: each round adds the member -- possibly one already chosen --
  whose addition gives the best mIoU of the running mean, so counts become weights;
* **the earliest best state is kept** (the start counts as a state), so more rounds never
  make the result worse on the sample it was chosen on;
* **bagging** (:func:`bagged_greedy`): the selection is repeated on bootstrap resamples of the
  videos (a resampled video's pixels weigh its multiplicity) and the bags' weights averaged,
  which curbs the weights' overfitting to a few videos.
"""

from __future__ import annotations

import numpy as np

from vspw_ray.ensemble.core.sample import weighted_confusion
from vspw_ray.metrics import mean_iou

__all__ = ["greedy_select", "bagged_greedy", "video_resample"]


def _miou(total: np.ndarray, labels: np.ndarray, weights: np.ndarray, c: int) -> float:
    return mean_iou(weighted_confusion(labels, total.argmax(-1), weights, c))


def greedy_select(member_scores: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                  rounds: int, *, init: int = 1) -> tuple[np.ndarray, list[float]]:
    """Forward selection with replacement on a weighted pixel sample.

    Args:
        member_scores: ``[M, N, C]`` each member's scores of the sampled pixels.
        labels: ``[N]`` reduced ground-truth ids.
        weights: ``[N]`` pixel weights (see :mod:`vspw_ray.ensemble.core.sample`).
        rounds: members added after the start, one per round.
        init: the start: the ``init`` best single members (ties: the lower index), once each.

    Returns:
        ``counts [M]``: how often each member is in the earliest best state, and the mIoU of
        every state (``rounds + 1`` values: the start, then each round). Members weigh
        ``counts / counts.sum()``; the argmax of the running sum equals that of the mean, so
        sums are compared. Ties between candidates go to the lower member index.
    """
    m, _, c = member_scores.shape
    if rounds < 0 or m < 1 or not 1 <= init <= m:
        raise ValueError(f"greedy selection needs rounds >= 0, members and 1 <= init <= "
                         f"members, got {rounds} rounds, init {init} and {m} members")
    singles = [_miou(member_scores[j], labels, weights, c) for j in range(m)]
    start = sorted(range(m), key=lambda j: (-singles[j], j))[:init]
    total = member_scores[start].astype(np.float64).sum(0)
    chosen = list(start)
    history = [_miou(total, labels, weights, c)]
    for _ in range(rounds):
        scores = [_miou(total + member_scores[j], labels, weights, c) for j in range(m)]
        best = int(np.argmax(scores))
        total += member_scores[best]
        chosen.append(best)
        history.append(float(scores[best]))
    keep = init + int(np.argmax(history))
    return np.bincount(chosen[:keep], minlength=m), history


def video_resample(videos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each pixel's multiplicity ``[N]`` in one bootstrap resample of the videos (``videos
    [N]`` a video id per pixel): as many draws as there are videos, with replacement."""
    ids, index = np.unique(videos, return_inverse=True)
    counts = np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))
    return counts[index].astype(np.float64)


def bagged_greedy(member_scores: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                  videos: np.ndarray, rounds: int, *, init: int = 1, bags: int = 1,
                  seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy selection on ``bags`` bootstrap resamples of the videos, the weights averaged.

    Args:
        videos: ``[N]`` the video id of each sampled pixel.
        bags: 1 runs :func:`greedy_select` once on the sample itself (no resampling).

    Returns:
        The averaged member weights ``[M]`` (summing to 1) and each bag's counts.
    """
    if bags < 1:
        raise ValueError(f"bags must be at least 1, got {bags}")
    if bags == 1:
        counts, _ = greedy_select(member_scores, labels, weights, rounds, init=init)
        return counts / counts.sum(), [counts]
    rng = np.random.default_rng(seed)
    per_bag = []
    for _ in range(bags):
        mult = video_resample(videos, rng)
        keep = np.flatnonzero(mult > 0)
        counts, _ = greedy_select(member_scores[:, keep], labels[keep],
                                  weights[keep] * mult[keep], rounds, init=init)
        per_bag.append(counts)
    mean = np.mean([c / c.sum() for c in per_bag], axis=0)
    return mean / mean.sum(), per_bag
