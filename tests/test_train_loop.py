import itertools

import pytest
import torch

from vspw_ray.config import TrainConfig, config_from_dict
from vspw_ray.models import build_model
from vspw_ray.train.loop import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    param_groups,
    train_steps,
)

TINY = {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]}


def test_warmup_then_poly_schedule():
    cfg = TrainConfig(iters=100, lr=1e-3, warmup_iters=10, warmup_ratio=0.1, poly_power=1.0)
    assert lr_factor(0, cfg) == pytest.approx(0.1 * 1.0)
    assert lr_factor(5, cfg) == pytest.approx((1 - 0.5 * 0.9) * 0.95)
    assert lr_factor(10, cfg) == pytest.approx(0.9)
    assert lr_factor(100, cfg) == pytest.approx(0.0)
    factors = [lr_factor(i, cfg) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_no_decay_on_norms_biases_and_position_tables():
    model = build_model(config_from_dict({"name": "t", "model": {"backbone_kwargs": TINY,
                                                                  "channels": 16, "aux_channels": 8}}), 3)
    groups = param_groups(model, lr=1.0, weight_decay=0.05, backbone_lr_mult=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            no_decay = p.ndim == 1 or "relative_position_bias_table" in n
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), n
            assert g["lr"] == (0.1 if n.startswith("backbone.") else 1.0), n
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.slow(10)
def test_tiny_upernet_fits_four_camvid_frames(camvid_four_frames):
    """The parts fit together: 90 steps at 120x160 (about 10 s here) reach pixel accuracy > 0.9."""
    torch.manual_seed(0)
    images, masks = camvid_four_frames
    cfg = config_from_dict({
        "name": "fit",
        "model": {"backbone_kwargs": TINY, "channels": 64, "aux_channels": 32,
                  "drop_path_rate": 0.0, "dropout": 0.0},
        "train": {"iters": 90, "batch_size": 4, "lr": 1e-3, "warmup_iters": 10},
    })
    model = build_model(cfg, 11)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    first = {}
    last = train_steps(model, optimizer, scheduler, itertools.repeat({"image": images, "mask": masks}),
                       cfg.train.iters, device=torch.device("cpu"),
                       on_step=lambda i, t, s: first.setdefault("loss", t["loss"]))
    assert last["loss"] < first["loss"] / 3
    model.eval()
    pred = model.predict(images).argmax(1)
    valid = masks != 255
    accuracy = (pred == masks)[valid].float().mean().item()
    assert accuracy > 0.9, accuracy
