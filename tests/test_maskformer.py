import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vspw_ray.config import config_from_dict
from vspw_ray.models import build_model
from vspw_ray.models.maskformer import (
    SetCriterion,
    dice_loss,
    hungarian_match,
    match_cost,
    semantic_inference,
    sigmoid_focal_loss,
)
from vspw_ray.train.loop import build_optimizer, build_scheduler, train_steps

TINY = {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]}
TINY_MF = {"family": "maskformer", "backbone_kwargs": TINY, "num_queries": 16, "hidden_dim": 64,
           "mask_dim": 64, "dec_layers": 2, "nheads": 4, "dim_feedforward": 128}


def tiny_maskformer(num_classes, prior=None, **sections):
    model = {**TINY_MF, **sections.pop("model", {})}
    return build_model(config_from_dict({"name": "mf", "model": model, **sections}), num_classes, prior)


@pytest.mark.parametrize("size", [(64, 64), (97, 131), (33, 45)])
def test_shapes_and_distributions_at_odd_sizes(size):
    torch.manual_seed(0)
    model = tiny_maskformer(5)
    x, y = torch.randn(2, 3, *size), torch.randint(0, 5, (2, *size))
    y[:, :3] = 255
    losses = model(x, y)
    # final layer + one intermediate layer (deep supervision), three terms each
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    sum(losses.values()).backward()
    model.eval()
    probs = model.predict(x)
    assert probs.shape == (2, 5, *size)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, *size))
    raw = model.predict(x, normalize=False)
    torch.testing.assert_close(raw / raw.sum(1, keepdim=True), probs)


def test_hungarian_matching_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = int(rng.integers(2, 6))
        t = min(int(rng.integers(1, 4)), q)
        cost = torch.from_numpy(rng.normal(size=(q, t)))
        rows, cols = hungarian_match(cost)
        best = min(sum(cost[p[j], j].item() for j in range(t))
                   for p in itertools.permutations(range(q), t))
        assert cost[rows, cols].sum().item() == pytest.approx(best)
        assert len(set(rows.tolist())) == t and sorted(cols.tolist()) == list(range(t))


def test_match_cost_equals_per_pair_losses():
    torch.manual_seed(1)
    logits, masks = torch.randn(4, 3), torch.randn(4, 20)
    labels, tgt = torch.tensor([0, 1]), (torch.rand(2, 20) > 0.5).float()
    cost = match_cost(logits, masks, labels, tgt, class_weight=1.0, mask_weight=20.0, dice_weight=1.0)
    for i in range(4):
        for j in range(2):
            expected = (-logits[i].softmax(-1)[labels[j]]
                        + 20 * sigmoid_focal_loss(masks[i:i + 1], tgt[j:j + 1], 1)
                        + dice_loss(masks[i:i + 1], tgt[j:j + 1], 1))
            assert cost[i, j].item() == pytest.approx(expected.item(), rel=1e-5)


def test_criterion_on_a_hand_made_two_class_case():
    # 3 queries, classes {0, 1} + no-object, a 2x4 frame: left half class 0, right half class 1,
    # one void pixel (no mask holds it)
    target = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 1]]])
    logits = torch.tensor([[[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    masks = torch.stack([torch.where(target[0] == 1, 6.0, -6.0),  # query 0 ~ right
                         torch.where(target[0] == 0, 6.0, -6.0),  # query 1 ~ left
                         torch.zeros(2, 4)])[None]
    crit = SetCriterion(2, no_object_weight=0.1)
    losses = crit({"pred_logits": logits, "pred_masks": masks}, target)
    # direct computation: query 1 <-> class 0 (left), query 0 <-> class 1 (right), query 2 empty
    tgt_masks = torch.stack([(target[0] == 0), (target[0] == 1)]).float().flatten(1)
    src = torch.stack([masks[0, 1], masks[0, 0]]).flatten(1)
    ce_w = torch.tensor([1.0, 1.0, 0.1])
    ce = F.cross_entropy(logits[0], torch.tensor([1, 0, 2]), weight=ce_w)
    assert losses["loss_ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    p = src.sigmoid()
    bce = F.binary_cross_entropy_with_logits(src, tgt_masks, reduction="none")
    p_t = p * tgt_masks + (1 - p) * (1 - tgt_masks)
    focal = ((0.25 * tgt_masks + 0.75 * (1 - tgt_masks)) * bce * (1 - p_t) ** 2).mean(1).sum() / 2
    dice = (1 - (2 * (p * tgt_masks).sum(1) + 1) / (p.sum(1) + tgt_masks.sum(1) + 1)).sum() / 2
    assert losses["loss_mask"].item() == pytest.approx(20 * focal.item(), rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice.item(), rel=1e-5)


def test_semantic_inference_formula():
    torch.manual_seed(2)
    cls, masks = torch.randn(1, 3, 3), torch.randn(1, 3, 2, 2)
    scores = semantic_inference(cls, masks, normalize=False)
    probs = cls.softmax(-1)
    for c in range(2):
        expected = sum(probs[0, q, c] * masks[0, q].sigmoid() for q in range(3))
        torch.testing.assert_close(scores[0, c], expected)
    norm = semantic_inference(cls, masks)
    torch.testing.assert_close(norm, scores / scores.sum(1, keepdim=True))


def test_logit_adjustment_leaves_the_no_object_logit_alone():
    torch.manual_seed(3)
    prior = np.array([0.9, 0.1])
    model = tiny_maskformer(2, prior=prior, loss={"logit_adjust": {"enabled": True, "tau": 1.0}})
    head = model.predictor.class_head
    h = torch.randn(1, 4, 64)
    adjusted, learned = head(h, adjust=True), head(h, adjust=False)
    torch.testing.assert_close(adjusted[..., :2], learned[..., :2] + torch.tensor(prior).log().float())
    torch.testing.assert_close(adjusted[..., 2], learned[..., 2])


@pytest.mark.slow(12)
def test_tiny_maskformer_fits_four_camvid_frames(camvid_four_frames):
    """150 steps (about 12 s here) reach pixel accuracy > 0.85 at 120x160."""
    torch.manual_seed(0)
    images, masks = camvid_four_frames
    cfg = config_from_dict({"name": "fit", "model": {**TINY_MF, "drop_path_rate": 0.0, "dec_dropout": 0.0},
                            "train": {"iters": 150, "batch_size": 4, "lr": 1e-3, "warmup_iters": 10}})
    model = build_model(cfg, 11)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    train_steps(model, optimizer, scheduler, itertools.repeat({"image": images, "mask": masks}),
                cfg.train.iters, device=torch.device("cpu"))
    model.eval()
    pred = model.predict(images).argmax(1)
    valid = masks != 255
    accuracy = (pred == masks)[valid].float().mean().item()
    assert accuracy > 0.85, accuracy
