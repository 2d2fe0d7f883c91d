"""The official VSPW metrics (VSPW_code ``utils.Evaluator`` and ``VC_perclip.py``).

* One confusion matrix (rows: ground truth, columns: prediction) over all frames of all videos;
  pixels whose ground truth is ignored (255) do not count.
* IoU per class ``diag / (row + col - diag)``; **mIoU averages over the classes present in the
  ground truth** (rows with pixels). A class that is predicted but absent from the ground truth
  does not count -- unlike mmsegmentation, where it counts as 0 -- but its false positives still
  enlarge the union of the classes they were taken from.
* Frequency-weighted IoU ``sum_c row_c / total * IoU_c`` over present classes; pixel accuracy.
* Video consistency VC_n: per video with more than ``n`` frames, for each window start
  ``i in range(len(frames) - n)`` (note: the last possible window is left out, as in the
  official code), among pixels whose *raw* ground truth (void included) is constant over frames
  ``i..i+n-1``, the share whose prediction is constant too. Windows with no such pixel (NaN)
  are dropped; VC_n is the mean over all windows of all videos.

Both accumulators are mergeable, so workers, processes and ensemble searches can each
accumulate a part and add them up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


def fold_metric(fold: str, name: str = "miou") -> str:
    """The reported name of a metric on a fold of val: ``fold_metric("A") == "val_A/miou"``."""
    return f"val_{fold}/{name}"


VAL_A_MIOU = fold_metric("A")  # the selection metric: chosen on fold A ...
VAL_B_MIOU = fold_metric("B")  # ... reported on fold B

__all__ = [
    "Interval",
    "bootstrap_miou_difference",
    "VAL_A_MIOU",
    "VAL_B_MIOU",
    "fold_metric",
    "ConfusionMatrix",
    "VideoConsistency",
    "confusion",
    "iou_per_class",
    "mean_iou",
    "fw_iou",
    "pixel_accuracy",
    "summarize",
]

IGNORE = 255


def confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int, *, raw: bool = False) -> np.ndarray:
    """Confusion matrix ``[C, C]`` int64 of one frame (or a batch).

    ``gt`` holds reduced ids (255 ignored), or raw VSPW mask values with ``raw=True`` (0 and 255
    ignored, ``1..C`` are the classes); ``pred`` holds reduced ids.

    One ``bincount`` over ``gt * C + pred`` in uint16 counts all 256 possible ground-truth rows;
    the class rows are sliced out afterwards and any count in a row that is neither a class nor
    ignored is an error. This avoids boolean masking and table lookups, each of which costs more
    than the bincount itself on 853x480 frames.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    c = num_classes
    if c > 254:
        raise ValueError("at most 254 classes fit 8-bit masks")
    first = 1 if raw else 0  # the row of class 0
    if gt.size == 0:
        return np.zeros((c, c), np.int64)
    if gt.dtype != np.uint8:
        if gt.min() < 0 or gt.max() > IGNORE:
            raise ValueError(f"ground truth holds ids outside 0..{c - 1} and 255")
        gt = gt.astype(np.uint8)
    if (pred.dtype.kind == "i" and pred.min() < 0) or pred.max() >= c:
        ignored = (gt == IGNORE) | (gt == 0) if raw else gt == IGNORE
        bad = (pred < 0) | (pred >= c)
        counted = bad & ~ignored
        if counted.any():
            raise ValueError(f"prediction holds class ids {np.unique(pred[counted]).tolist()[:10]} "
                             f"outside 0..{c - 1}")
        pred = np.where(bad, 0, pred)  # only under ignored pixels, which do not count
    index = gt.astype(np.uint16)
    index *= c
    index += pred if pred.dtype == np.uint8 else pred.astype(np.uint16)
    counts = np.bincount(index.ravel(), minlength=256 * c).reshape(256, c)
    invalid = np.ones(256, bool)
    invalid[first : first + c] = False
    invalid[IGNORE] = False
    if raw:
        invalid[0] = False
    if counts[invalid].any():
        bad_ids = np.flatnonzero(invalid & (counts.sum(1) > 0))
        raise ValueError(f"ground truth holds ids {bad_ids.tolist()[:10]} outside the class table")
    return counts[first : first + c].astype(np.int64)


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN where the class is absent from the ground truth."""
    m = np.asarray(matrix, dtype=np.float64)
    diag, rows, cols = np.diag(m), m.sum(1), m.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = diag / (rows + cols - diag)
    iou[rows == 0] = np.nan
    return iou


def mean_iou(matrix: np.ndarray) -> float:
    iou = iou_per_class(matrix)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else math.nan


def _batch_miou(m: np.ndarray) -> np.ndarray:
    """:func:`mean_iou` of every matrix of ``m [..., C, C]``."""
    diag = np.diagonal(m, axis1=-2, axis2=-1)
    rows, cols = m.sum(-1), m.sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(rows > 0, diag / (rows + cols - diag), np.nan)
        return np.nanmean(iou, axis=-1)


@dataclass(frozen=True)
class Interval:
    """A difference of mIoU (fraction, not points) and its bootstrap interval."""

    value: float
    low: float
    high: float
    level: float
    samples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap_miou_difference(x: Sequence[Mapping[str, np.ndarray]],
                              y: Sequence[Mapping[str, np.ndarray]], videos: Sequence[str], *,
                              samples: int = 2000, level: float = 0.95, seed: int = 0,
                              chunk: int = 250) -> Interval:
    """``mIoU(x) - mIoU(y)``, the mean over seeds, with a paired percentile bootstrap over
    videos.

    Args:
        x, y: one mapping per seed (the same seeds, in the same order): video -> its confusion
            matrix ``[C, C]`` (official mIoU is that of the summed matrix).
        videos: the videos resampled (e.g. fold B's).

    Each resample draws ``len(videos)`` videos with replacement, the same draw for every seed
    and for both sides, so what varies between the sides is the models, not the videos.
    """
    if len(x) != len(y) or not x:
        raise ValueError(f"bootstrap needs the same seeds on both sides, got {len(x)} and {len(y)}")
    stack = [np.stack([np.asarray(side[s][v], np.float64) for v in videos])
             for side in (x, y) for s in range(len(x))]
    xs, ys = np.stack(stack[:len(x)]), np.stack(stack[len(x):])  # [S, V, C, C]
    observed = float(np.mean(_batch_miou(xs.sum(1)) - _batch_miou(ys.sum(1))))
    rng = np.random.default_rng(seed)
    n = len(videos)
    diffs = []
    for start in range(0, samples, chunk):
        draws = rng.integers(0, n, size=(min(chunk, samples - start), n))
        counts = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)
        mx = _batch_miou(np.einsum("bv,svcd->bscd", counts, xs))
        my = _batch_miou(np.einsum("bv,svcd->bscd", counts, ys))
        diffs.append(np.nanmean(mx - my, axis=1))
    d = np.concatenate(diffs)
    tail = 100 * (1 - level) / 2
    return Interval(observed, float(np.nanpercentile(d, tail)),
                    float(np.nanpercentile(d, 100 - tail)), level, samples)


def fw_iou(matrix: np.ndarray) -> float:
    m = np.asarray(matrix, dtype=np.float64)
    total = m.sum()
    if total == 0:
        return math.nan
    iou = iou_per_class(m)
    freq = m.sum(1) / total
    present = freq > 0
    return float((freq[present] * iou[present]).sum())


def pixel_accuracy(matrix: np.ndarray) -> float:
    m = np.asarray(matrix, dtype=np.float64)
    total = m.sum()
    return float(np.diag(m).sum() / total) if total else math.nan


@dataclass
class ConfusionMatrix:
    """Accumulates the confusion matrix over frames; ``+`` merges two accumulators."""

    num_classes: int
    matrix: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.matrix is None:
            self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray, *, raw: bool = False) -> None:
        self.matrix += confusion(pred, gt, self.num_classes, raw=raw)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class and {self.num_classes}-class matrices")
        self.matrix += other.matrix
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_classes, self.matrix.copy()).merge(other)


@dataclass
class VideoConsistency:
    """Streaming VC_n for several window sizes, one frame at a time, in constant memory.

    Per pixel it keeps how many consecutive frames, up to the current one, the raw ground truth
    (and the prediction) has kept its value: a window of ``n`` frames ending here is constant
    exactly when that run is at least ``n``.
    """

    windows: tuple[int, ...] = (8, 16)
    accs: dict[int, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for n in self.windows:
            self.accs.setdefault(n, [])
        self._reset_video()

    def _reset_video(self) -> None:
        self._t = 0  # frames of the current video seen so far
        self._prev: tuple[np.ndarray, np.ndarray] | None = None
        self._runs: tuple[np.ndarray, np.ndarray] | None = None
        self._pending: dict[int, list[float]] = {n: [] for n in self.windows}

    def update(self, raw_gt: np.ndarray, pred: np.ndarray) -> None:
        """Add the next frame of the current video (raw mask values and predicted ids)."""
        cap = max(self.windows)  # runs are only compared with window sizes: cap them in uint8
        if self._prev is None:
            self._runs = (np.ones(raw_gt.shape, np.uint8), np.ones(raw_gt.shape, np.uint8))
        else:
            if self._prev[0].shape != raw_gt.shape or pred.shape != raw_gt.shape:
                raise ValueError("frames and predictions of one video must share one size")
            for run, now, before in zip(self._runs, (raw_gt, pred), self._prev):
                np.minimum(run, np.uint8(cap - 1), out=run)
                run *= now == before  # a change restarts the run: 0 + 1 frame
                run += 1
        self._prev = (raw_gt, pred)
        self._t += 1
        run_gt, run_pred = self._runs
        for n in self.windows:
            if self._t < n:  # no window of n frames ends here yet
                continue
            gt_const = run_gt >= n
            den = int(np.count_nonzero(gt_const))
            gt_const &= run_pred >= n
            num = int(np.count_nonzero(gt_const))
            self._pending[n].append(num / den if den else math.nan)

    def end_video(self) -> None:
        """Close the current video: its last window is dropped as in ``range(len(frames) - n)``."""
        for n in self.windows:
            self.accs[n].extend(self._pending[n][:-1])
        self._reset_video()

    def add_video(self, raw_gts: Iterable[np.ndarray], preds: Iterable[np.ndarray]) -> None:
        for g, p in zip(raw_gts, preds):
            self.update(g, p)
        self.end_video()

    def merge(self, other: VideoConsistency) -> VideoConsistency:
        for n in self.windows:
            self.accs[n].extend(other.accs.get(n, []))
        return self

    def value(self, n: int) -> float:
        vals = np.asarray(self.accs[n], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        return float(vals.mean()) if vals.size else math.nan


def _none_if_nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def summarize(matrix: np.ndarray, class_names: Sequence[str],
              vc: VideoConsistency | None = None) -> dict:
    """The report every stage logs: ``miou, fwiou, pixel_acc, vc8, vc16`` (fractions in [0, 1],
    None when undefined) and ``per_class_iou`` (name -> IoU, None when absent from the GT)."""
    iou = iou_per_class(matrix)
    return {
        "miou": _none_if_nan(mean_iou(matrix)),
        "fwiou": _none_if_nan(fw_iou(matrix)),
        "pixel_acc": _none_if_nan(pixel_accuracy(matrix)),
        "vc8": _none_if_nan(vc.value(8)) if vc and 8 in vc.windows else None,
        "vc16": _none_if_nan(vc.value(16)) if vc and 16 in vc.windows else None,
        "per_class_iou": {name: _none_if_nan(float(v)) for name, v in zip(class_names, iou)},
    }
