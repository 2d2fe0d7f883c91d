"""The training loop as plain functions, every dependency passed in (torchvision-references
style): optimizer and schedule construction, ``forward_loss`` (the model's forward and loss,
compiled or eager), ``train_steps`` and ``evaluate_model``.

A step never waits for the device: loss terms stay device tensors until whoever reports them
converts them (``float(v)``), once per ``train.log_interval``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from vspw_ray.config import TrainConfig
from vspw_ray.labels import class_labels
from vspw_ray.metrics import ConfusionMatrix, VideoConsistency

__all__ = [
    "param_groups",
    "build_optimizer",
    "lr_factor",
    "build_scheduler",
    "forward_loss",
    "train_steps",
    "evaluate_model",
]

# Parameters that get no weight decay besides biases and norm weights (all 1-D tensors).
_NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "log_scale")


def param_groups(model: nn.Module, *, lr: float, weight_decay: float,
                 backbone_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups: no decay on norms, biases and position-bias tables; the backbone's
    learning rate multiplied by ``backbone_lr_mult``."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or any(k in name for k in _NO_DECAY_NAMES)
        backbone = ".backbone." in f".{name}" or name.startswith("backbone.")
        groups.setdefault((backbone, no_decay), []).append(p)
    return [{"params": ps, "lr": lr * (backbone_lr_mult if bb else 1.0),
             "weight_decay": 0.0 if nd else weight_decay, "name": f"{'backbone' if bb else 'head'}"
             f"{'_no_decay' if nd else ''}"} for (bb, nd), ps in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                          backbone_lr_mult=cfg.backbone_lr_mult),
                             lr=cfg.lr, betas=(0.9, 0.999))


def lr_factor(it: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at iteration ``it``: poly decay to ``min_lr`` with a linear
    warmup from ``warmup_ratio`` over the first ``warmup_iters`` (mmseg's schedule)."""
    poly = (1 - min(it, cfg.iters) / cfg.iters) ** cfg.poly_power
    factor = (1 - cfg.min_lr / cfg.lr) * poly + cfg.min_lr / cfg.lr
    if it < cfg.warmup_iters:
        k = (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        factor *= 1 - k
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))


LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def forward_loss(model: nn.Module, *, compile: bool = False, backend: str = "inductor") -> LossFn:
    """``(images, targets) -> (loss, terms)``: the model's loss terms and their sum.

    With ``compile`` the model's forward and loss run compiled (``torch.compile``,
    ``dynamic=False``: training crops have one shape); ``model`` itself stays eager, for
    evaluation on whole frames of any size. Make it once per run: the compiled graphs live on
    it. A DDP-wrapped ``model`` is compiled as PyTorch documents it (DDP first, then compile),
    so gradient buckets still overlap the backward.
    """
    net = torch.compile(model, dynamic=False, backend=backend) if compile else model

    def step(images: torch.Tensor, targets: torch.Tensor):
        terms = net(images, targets)
        return torch.stack(list(terms.values())).sum(), terms

    return step


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, batches: Iterator,
                steps: int, *, device: torch.device, autocast=None, scaler=None,
                grad_clip: float | None = None,
                on_step: Callable[[int, dict[str, torch.Tensor], float], None] | None = None,
                forward: LossFn | None = None) -> dict[str, torch.Tensor]:
    """Run ``steps`` optimisation steps on batches ``{"image", "mask"}`` from ``batches``.

    ``forward`` is :func:`forward_loss` of ``model`` (eager when None). ``on_step(step_index,
    loss_terms, seconds)`` is called after each step; ``seconds`` is host time (a GPU step is
    measured only where something waits for it). Returns the last step's loss terms and their
    sum (``"loss"``) as detached 0-dim device tensors: nothing here synchronises with the
    device, ``float(terms["loss"])`` does.
    """
    model.train()
    forward = forward or forward_loss(model)
    autocast = autocast or contextlib.nullcontext()
    terms: dict[str, torch.Tensor] = {}
    for i in range(steps):
        start = time.perf_counter()
        batch = next(batches)
        images = batch["image"].to(device, non_blocking=True)
        targets = batch["mask"].to(device, non_blocking=True)
        with autocast:
            loss, losses = forward(images, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        terms = {k: v.detach() for k, v in losses.items()}
        terms["loss"] = loss.detach()
        if on_step:
            on_step(i, terms, time.perf_counter() - start)
    return terms


@torch.no_grad()
def evaluate_model(model: nn.Module, items: Iterable[dict], num_classes: int, *,
                   device: torch.device, autocast=None
                   ) -> tuple[dict[str, ConfusionMatrix], VideoConsistency]:
    """Official metrics of ``model.predict`` over whole frames from :class:`EvalDataset` items
    (batch size 1, in video order): each video's confusion matrix (their sum is the official
    one; bootstrap intervals over videos resample them) and the VC windows."""
    model.eval()
    autocast = autocast or contextlib.nullcontext()
    videos: dict[str, ConfusionMatrix] = {}
    vc = VideoConsistency((8, 16))
    current = None
    for item in items:
        if current is not None and item["video"] != current:
            vc.end_video()
        current = item["video"]
        with autocast:
            probs = model.predict(item["image"].unsqueeze(0).to(device))
        pred = class_labels(probs, 1)[0].cpu().numpy().astype(np.uint8)
        videos.setdefault(current, ConfusionMatrix(num_classes)).update(pred, item["mask"].numpy())
        vc.update(item["raw_mask"].numpy(), pred)
    if current is not None:
        vc.end_video()
    return videos, vc
