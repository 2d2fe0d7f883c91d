import numpy as np
import pytest
import torch

from vspw_ray.losses import distill_kl, ohem_cross_entropy, ohem_mask


def ohem_reference(logits, target, thresh, min_kept):
    """Direct numpy transcription of mmseg's OHEM pixel sampler + mean over kept pixels."""
    lg = logits.double().numpy()
    tg = target.numpy()
    prob = np.exp(lg - lg.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    b, c, h, w = lg.shape
    valid = tg != 255
    gt_prob = np.zeros((b, h, w))
    ce = np.zeros((b, h, w))
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if valid[i, y, x]:
                    gt_prob[i, y, x] = prob[i, tg[i, y, x], y, x]
                    ce[i, y, x] = -np.log(prob[i, tg[i, y, x], y, x])
    probs = np.sort(gt_prob[valid])
    threshold = max(thresh, probs[min(min_kept * b, probs.size - 1)]) if probs.size else thresh
    keep = valid & (gt_prob < threshold)
    return keep, (ce * keep).sum() / max(keep.sum(), 1)


@pytest.mark.parametrize("thresh, min_kept", [(0.7, 0), (0.7, 10), (0.05, 0), (0.05, 20), (0.3, 1000)])
def test_ohem_matches_reference_with_void(thresh, min_kept):
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 7) * 2
    target = torch.randint(0, 4, (2, 6, 7))
    target[0, :2] = 255  # void pixels
    keep_ref, loss_ref = ohem_reference(logits, target, thresh, min_kept)
    keep = ohem_mask(logits, target, thresh, min_kept)
    assert np.array_equal(keep.numpy(), keep_ref)
    assert not keep[0, :2].any()
    assert ohem_cross_entropy(logits, target, thresh=thresh, min_kept=min_kept).item() == \
        pytest.approx(loss_ref, rel=1e-5)


def test_min_kept_raises_the_threshold():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 8, 8)
    target = logits.argmax(1)  # confident and right: few pixels below a low threshold
    few = ohem_mask(logits, target, 0.2, 0).sum()
    many = ohem_mask(logits, target, 0.2, 40).sum()
    assert many >= 40 > few


def test_ohem_under_autocast():
    logits = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16)
    target = torch.randint(0, 3, (2, 5, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=5)
    assert loss.dtype == torch.float32 and loss.isfinite()


def test_distill_kl_zero_for_equal_and_matches_formula():
    torch.manual_seed(2)
    s = torch.randn(2, 5, 4, 4).log_softmax(1)
    t = torch.randn(2, 5, 4, 4).log_softmax(1)
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    valid[1] = False
    assert distill_kl(t, t, valid, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    ts, ss = (t / 2.0).log_softmax(1), (s / 2.0).log_softmax(1)
    expected = 4.0 * (ts.exp() * (ts - ss)).sum(1)[0].mean()
    assert distill_kl(s, t, valid, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
