"""Metrics against hand-computed cases and a direct transcription of the official formulas."""

import math

import numpy as np
import pytest

from vspw_ray.metrics import (
    ConfusionMatrix,
    VideoConsistency,
    confusion,
    fw_iou,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
    summarize,
)


def official_miou(gt_reduced, pred, c):
    """The official Evaluator, written out: bincount, IoU, mean over rows with pixels."""
    mask = (gt_reduced >= 0) & (gt_reduced < c)
    m = np.bincount(c * gt_reduced[mask].astype(int) + pred[mask], minlength=c * c).reshape(c, c)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.diag(m) / (m.sum(1) + m.sum(0) - np.diag(m))
    isval = m.sum(1) > 0
    miou = np.nansum(iou * isval) / isval.sum()
    freq = m.sum(1) / m.sum()
    fw = (freq[freq > 0] * iou[freq > 0]).sum()
    return miou, fw, np.diag(m).sum() / m.sum()


def official_vc(gts, preds, n):
    """VC_perclip.get_common, written out, for one video."""
    accs = []
    for i in range(len(gts) - n):
        gc = np.ones(gts[0].shape, bool)
        pc = np.ones(gts[0].shape, bool)
        for j in range(1, n):
            gc &= gts[i] == gts[i + j]
            pc &= preds[i] == preds[i + j]
        accs.append((pc & gc).sum() / gc.sum() if gc.sum() else np.nan)
    return accs


def test_hand_computed_two_classes_with_absent_predicted_class():
    gt = np.array([[0, 0, 1, 1, 255]])
    pred = np.array([[0, 2, 1, 0, 1]])  # class 2 is predicted but absent from the ground truth
    m = confusion(pred, gt, 3)
    assert m.tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    iou = iou_per_class(m)
    # class 0: tp 1, fn 1 (->2), fp 1 (from gt 1) -> 1/3 ; class 1: tp 1, fn 1, fp 0 -> 1/2
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == pytest.approx(1 / 2)
    assert math.isnan(iou[2])
    assert mean_iou(m) == pytest.approx((1 / 3 + 1 / 2) / 2)  # class 2 does not count
    assert fw_iou(m) == pytest.approx(0.5 * 1 / 3 + 0.5 * 1 / 2)
    assert pixel_accuracy(m) == pytest.approx(2 / 4)
    report = summarize(m, ["a", "b", "c"])
    assert report["per_class_iou"]["c"] is None and report["vc8"] is None


def test_equals_official_formulas_on_random_frames():
    rng = np.random.default_rng(0)
    c = 7
    acc = ConfusionMatrix(c)
    gts, preds = [], []
    for _ in range(5):
        gt = rng.integers(0, c - 1, size=(20, 30))  # class c-1 never in the ground truth
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, np.minimum(gt, c - 1), rng.integers(0, c, gt.shape))
        acc.update(pred, gt)
        gts.append(gt)
        preds.append(pred)
    miou, fw, pa = official_miou(np.concatenate(gts), np.concatenate(preds), c)
    assert mean_iou(acc.matrix) == pytest.approx(miou)
    assert fw_iou(acc.matrix) == pytest.approx(fw)
    assert pixel_accuracy(acc.matrix) == pytest.approx(pa)


def test_merging_accumulators_equals_accumulating_once():
    rng = np.random.default_rng(1)
    frames = [(rng.integers(0, 4, (8, 8)), rng.integers(0, 4, (8, 8))) for _ in range(6)]
    once, a, b = ConfusionMatrix(4), ConfusionMatrix(4), ConfusionMatrix(4)
    for i, (p, g) in enumerate(frames):
        once.update(p, g)
        (a if i % 2 else b).update(p, g)
    assert np.array_equal((a + b).matrix, once.matrix)
    assert np.array_equal(a.merge(b).matrix, once.matrix)


@pytest.mark.parametrize("length", [3, 8, 9, 12, 17, 20])
def test_video_consistency_equals_official(length):
    rng = np.random.default_rng(length)
    # piecewise-constant ground truth with void, predictions that flicker
    gts, preds = [], []
    g = rng.integers(0, 3, (10, 12)).astype(np.uint8)
    p = g.copy()
    for _ in range(length):
        change = rng.random(g.shape) < 0.05
        g = np.where(change, rng.choice([0, 1, 2, 255], g.shape), g).astype(np.uint8)
        p = np.where(rng.random(g.shape) < 0.1, rng.integers(0, 3, g.shape), p).astype(np.uint8)
        gts.append(g)
        preds.append(p)
    vc = VideoConsistency((8, 16))
    vc.add_video(gts, preds)
    for n in (8, 16):
        expected = official_vc(gts, preds, n)
        assert len(vc.accs[n]) == len(expected)  # videos shorter than the window add none
        np.testing.assert_allclose(vc.accs[n], expected)


def test_vc_nan_windows_dropped_and_merge():
    gts = [np.full((2, 2), i % 2, np.uint8) for i in range(10)]  # gt never constant: NaN windows
    a = VideoConsistency((8,))
    a.add_video(gts, gts)
    assert len(a.accs[8]) == 2 and all(math.isnan(x) for x in a.accs[8])
    assert math.isnan(a.value(8))
    b = VideoConsistency((8,))
    b.add_video([np.zeros((2, 2), np.uint8)] * 10, [np.zeros((2, 2), np.uint8)] * 10)
    assert a.merge(b).value(8) == 1.0


def test_out_of_range_prediction_is_an_error():
    with pytest.raises(ValueError, match=r"\[9\]"):
        confusion(np.array([9]), np.array([0]), 3)


def test_raw_ground_truth_rows_and_out_of_table_ids():
    raw = np.array([[0, 1, 2, 255, 3]], np.uint8)  # raw ids: 0 and 255 ignored, 1..3 classes
    pred = np.array([[2, 0, 1, 7, 2]], np.uint8)  # 7 sits under void: does not count
    assert confusion(pred, raw, 3, raw=True).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match=r"ids \[4\] outside the class table"):
        confusion(np.zeros((1, 2), np.uint8), np.array([[1, 4]], np.uint8), 3, raw=True)
    with pytest.raises(ValueError, match=r"ids \[3\] outside the class table"):
        confusion(np.zeros((1, 2), np.uint8), np.array([[0, 3]], np.uint8), 3)


def _video_matrices(rng, videos, c, noise):
    out = {}
    for v in videos:
        truth = rng.integers(50, 200, size=c)
        wrong = rng.integers(0, noise + 1, size=(c, c))
        out[v] = np.diag(truth) + wrong - np.diag(np.diag(wrong))
    return out


def test_bootstrap_difference_equals_a_straightforward_loop():
    from vspw_ray.metrics import bootstrap_miou_difference, mean_iou

    rng = np.random.default_rng(3)
    videos = [f"v{i}" for i in range(7)]
    x = [_video_matrices(rng, videos, 5, 20) for _ in range(2)]  # 2 seeds each side
    y = [_video_matrices(rng, videos, 5, 40) for _ in range(2)]
    got = bootstrap_miou_difference(x, y, videos, samples=300, seed=11, chunk=128)
    draws_rng, diffs = np.random.default_rng(11), []
    for start in range(0, 300, 128):  # the same draws, one resample at a time
        for draw in draws_rng.integers(0, 7, size=(min(128, 300 - start), 7)):
            picked = [videos[i] for i in draw]
            diffs.append(np.mean([mean_iou(sum(x[s][v] for v in picked))
                                  - mean_iou(sum(y[s][v] for v in picked)) for s in range(2)]))
    observed = np.mean([mean_iou(sum(x[s].values())) - mean_iou(sum(y[s].values()))
                        for s in range(2)])
    assert got.value == pytest.approx(observed, abs=1e-12)
    assert got.low == pytest.approx(np.percentile(diffs, 2.5), abs=1e-12)
    assert got.high == pytest.approx(np.percentile(diffs, 97.5), abs=1e-12)
    assert got.low > 0 and got.excludes_zero  # x is less noisy on every video


def test_bootstrap_of_identical_sides_is_zero_and_of_swapped_sides_is_mirrored():
    from vspw_ray.metrics import bootstrap_miou_difference

    rng = np.random.default_rng(0)
    videos = [f"v{i}" for i in range(5)]
    x, y = [_video_matrices(rng, videos, 4, 30)], [_video_matrices(rng, videos, 4, 30)]
    same = bootstrap_miou_difference(x, x, videos, samples=200)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero
    ab = bootstrap_miou_difference(x, y, videos, samples=200)
    ba = bootstrap_miou_difference(y, x, videos, samples=200)
    assert ab.value == pytest.approx(-ba.value) and ab.low == pytest.approx(-ba.high)


@pytest.mark.parametrize("shape, dim", [((2, 11, 36, 48), 1), ((11, 36, 48), 0), ((5, 7), -1)])
def test_class_labels_are_argmax_with_the_first_maximum_on_ties(shape, dim):
    import torch

    from vspw_ray.labels import class_labels

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, shape, generator=gen).float()  # many ties
    labels = class_labels(scores, dim)
    assert torch.equal(labels, scores.argmax(dim))
    # the first maximum: no smaller index along dim holds the same score
    picked = scores.gather(dim, labels.unsqueeze(dim))
    index = torch.arange(scores.shape[dim]).view([-1 if d == dim % scores.dim() else 1
                                                  for d in range(scores.dim())])
    earlier = (scores == picked) & (index < labels.unsqueeze(dim))
    assert not earlier.any()
    half = torch.rand(shape, generator=gen).half()
    assert torch.equal(class_labels(half, dim), half.argmax(dim))
