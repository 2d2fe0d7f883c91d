"""MaskFormer (Cheng et al. 2021) on a timm Swin backbone, behind the shared model interface.

Reads top to bottom: loss and cost functions, the Hungarian matcher, the set criterion, the
pixel decoder, the transformer decoder, the model and its builder.

* Pixel decoder: an FPN over the four backbone stages (GroupNorm, as MaskFormer's
  ``BasePixelDecoder``) ending in per-pixel mask embeddings at stride 4.
* Transformer decoder: learned queries attend to the last backbone stage (DETR decoder, post-norm,
  sine positional encoding); every layer's output goes through the shared final norm and predicts
  class logits over ``C + 1`` (the last is "no object") and a mask embedding (3-layer MLP);
  masks are query embeddings dot pixel embeddings.
* Set criterion: one target mask per class present in the frame (void removed: void pixels
  belong to no mask), Hungarian matching with cost ``class_weight * (-p[target class]) +
  mask_weight * sigmoid focal + dice_weight * dice``; cross-entropy over ``C + 1`` with the
  no-object class weighted ``no_object_weight``, sigmoid focal (alpha 0.25, gamma 2) and dice,
  on every decoder layer (deep supervision). Matching and mask losses use the masks at prediction
  resolution (stride 4) with the targets downsampled by nearest neighbour: the original computes
  the matching cost there too and upsamples predictions for the losses; at stride 4 the
  difference is a boundary effect and it saves 16x the memory.
* Semantic inference: ``scores = sum_q softmax(class_q)[:C] * sigmoid(mask_q)``, upsampled to the
  input size, normalised per pixel to a distribution (``normalize=False`` keeps the raw scores).
* Logit adjustment applies to the C real classes only: the no-object logit has no class prior
  (it is not a class of the dataset), so it stays a plain linear logit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from vspw_ray.losses import IGNORE_INDEX
from vspw_ray.models.backbone import SIZE_DIVISOR, SwinBackbone
from vspw_ray.models.classifier import CosineClassifier

__all__ = [
    "dice_loss",
    "sigmoid_focal_loss",
    "match_cost",
    "hungarian_match",
    "semantic_targets",
    "class_targets",
    "pairwise_costs",
    "assignment_table",
    "match_on_host",
    "SetCriterion",
    "PixelDecoder",
    "TransformerPredictor",
    "MaskFormer",
    "semantic_inference",
    "build_maskformer",
]


# --------------------------------------------------------------------------------------------
# Losses and matching costs. Masks are flattened: inputs [N, P] logits, targets [N, P] in {0, 1}.
# --------------------------------------------------------------------------------------------


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the masks' dice losses over ``num_masks``; ``weight [N]`` (0/1) leaves masks out
    without changing a shape."""
    p = inputs.sigmoid()
    numerator = 2 * (p * targets).sum(-1)
    denominator = p.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return (loss if weight is None else loss * weight).sum() / num_masks


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks,
                       alpha: float = 0.25, gamma: float = 2.0,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the masks' mean focal losses over ``num_masks``; ``weight [N]`` as in
    :func:`dice_loss`."""
    p = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = ((alpha * targets + (1 - alpha) * (1 - targets)) * loss).mean(-1)
    return (loss if weight is None else loss * weight).sum() / num_masks


def _pairwise_dice(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[..., Q, P] x [..., T, P] -> [..., Q, T]`` dice loss of every prediction against every
    target (batched over any leading dimensions)."""
    p = inputs.sigmoid()
    numerator = 2 * p @ targets.transpose(-1, -2)
    denominator = p.sum(-1)[..., :, None] + targets.sum(-1)[..., None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def _pairwise_focal(inputs: torch.Tensor, targets: torch.Tensor, alpha=0.25, gamma=2.0):
    """``[..., Q, P] x [..., T, P] -> [..., Q, T]`` mean sigmoid focal loss of each pair."""
    p = inputs.sigmoid()
    # the focal loss of a pixel against target 1 and against target 0, combined by the target
    # (two matmuls: folding them into (pos - neg) @ t + sum(neg) cancels small matched losses)
    pos = alpha * (1 - p) ** gamma * F.binary_cross_entropy_with_logits(
        inputs, torch.ones_like(inputs), reduction="none")
    neg = (1 - alpha) * p**gamma * F.binary_cross_entropy_with_logits(
        inputs, torch.zeros_like(inputs), reduction="none")
    t = targets.transpose(-1, -2)
    return (pos @ t + neg @ (1 - t)) / inputs.shape[-1]


@torch.no_grad()
def match_cost(class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor,
               masks: torch.Tensor, *, class_weight: float = 1.0, mask_weight: float = 20.0,
               dice_weight: float = 1.0) -> torch.Tensor:
    """Matching cost ``[Q, T]`` of one image. ``class_logits [Q, C+1]``, ``mask_logits [Q, P]``,
    ``labels [T]``, ``masks [T, P]``. The class term approximates the NLL by ``-p[target]``:
    the constant 1 does not change the matching. (The criterion computes the same costs for
    every image, layer and class at once: :func:`pairwise_costs`.)"""
    prob = class_logits.float().softmax(-1)
    mask_logits, masks = mask_logits.float(), masks.float()
    return (class_weight * -prob[:, labels] + mask_weight * _pairwise_focal(mask_logits, masks)
            + dice_weight * _pairwise_dice(mask_logits, masks))


def hungarian_match(cost: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of targets (columns) to distinct queries (rows)."""
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return rows.astype(np.int64), cols.astype(np.int64)


def semantic_targets(mask: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask [H, W]`` reduced ids -> ``labels [T]`` and binary ``masks [T, H, W]``, one per class
    present; void (255) pixels belong to no mask."""
    labels = torch.unique(mask)
    labels = labels[(labels != IGNORE_INDEX) & (labels < num_classes)]
    return labels, (mask[None] == labels[:, None, None]).float()


def class_targets(mask: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask [B, h, w]`` reduced ids -> ``masks [B, C, h * w]`` float (one binary mask per class,
    empty for the classes absent) and ``present [B, C]`` bool. Every class has a slot, so the
    shapes do not depend on the data (what :func:`semantic_targets` gives per image, padded)."""
    classes = torch.arange(num_classes, device=mask.device)
    masks = mask.flatten(1)[:, None, :] == classes[None, :, None]
    return masks.float(), masks.any(-1)


@torch.no_grad()
def pairwise_costs(class_logits: torch.Tensor, mask_logits: torch.Tensor, masks: torch.Tensor, *,
                   class_weight: float = 1.0, mask_weight: float = 20.0,
                   dice_weight: float = 1.0) -> torch.Tensor:
    """:func:`match_cost` of every query against every class, batched over images.

    Args:
        class_logits: ``[B, Q, C+1]``; mask_logits: ``[B, Q, P]``; masks: ``[B, C, P]`` binary.
    Returns:
        ``[B, Q, C]`` float32; the columns of absent classes are costs of empty masks, which the
        matching leaves out.
    """
    c = masks.shape[1]
    mask_logits = mask_logits.float()
    return (class_weight * -class_logits.float().softmax(-1)[..., :c]
            + mask_weight * _pairwise_focal(mask_logits, masks)
            + dice_weight * _pairwise_dice(mask_logits, masks))


def assignment_table(costs: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Hungarian matching of every (layer, image) on the host.

    Args:
        costs: ``[L, B, Q, C]``; present: ``[B, C]`` bool (the columns that are targets).
    Returns:
        ``[L, B, Q]`` int64: the class matched to each query, -1 for none.

    scipy's solver holds the GIL, so a thread pool does not help: 48 problems of 100 x 20 take
    under 1 ms in one thread (more on two).
    """
    table = np.full(costs.shape[:3], -1, dtype=np.int64)
    for b in range(costs.shape[1]):
        columns = np.flatnonzero(present[b])
        if columns.size == 0:
            continue
        for layer in range(costs.shape[0]):
            rows, cols = linear_sum_assignment(costs[layer, b][:, columns])
            table[layer, b, rows] = columns[cols]
    return table


@torch.compiler.disable
def match_on_host(costs: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`assignment_table` of ``costs [L, B, Q, C]`` with one device-to-host copy (costs
    and ``present [B, C]`` packed together) and one copy back; also the number of target masks
    averaged over workers (a tensor: nothing waits for it). The one graph break of a compiled
    MaskFormer step: the assignment is a host algorithm."""
    numel = costs.numel()
    host = torch.cat([costs.float().flatten(), present.float().flatten()]).cpu().numpy()
    table = assignment_table(host[:numel].reshape(costs.shape),
                             host[numel:].reshape(present.shape) > 0.5)
    assigned = torch.from_numpy(table).to(costs.device)
    return assigned, _num_masks_across_workers(present)


def _num_masks_across_workers(present: torch.Tensor) -> torch.Tensor:
    """Average number of target masks per worker (at least 1), so every worker normalises the
    loss alike; a device tensor, so no step waits on it."""
    total = present.sum().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        total = total / torch.distributed.get_world_size()
    return total.clamp(min=1.0)


class SetCriterion(nn.Module):
    """MaskFormer's loss over the final and every intermediate decoder layer.

    ``outputs``: ``{"pred_logits": [B, Q, C+1], "pred_masks": [B, Q, h, w], "aux_outputs": [...]}``;
    ``targets``: ``[B, H, W]`` reduced ids at a multiple of ``(h, w)``'s stride, 255 ignored.
    Returns ``{"loss_ce", "loss_mask", "loss_dice"}`` plus ``_{i}`` terms for layer ``i``.

    The costs of every image, layer and class come from batched tensor ops; only the assignment
    runs on the host (:func:`match_on_host`, one copy each way). Targets have one slot per
    class and unmatched queries weight 0, so every shape is fixed by the batch: the loss
    compiles, with the matching as its one graph break.
    """

    def __init__(self, num_classes: int, *, no_object_weight: float = 0.1,
                 class_weight: float = 1.0, mask_weight: float = 20.0, dice_weight: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def _layer_losses(self, logits, mask_logits, assigned, masks, num_masks):
        """One layer: ``logits [B, Q, C+1]``, ``mask_logits [B, Q, P]``, ``assigned [B, Q]``
        (the matched class, -1: no object), ``masks [B, C, P]``. The mask losses run over every
        query with its matched class's mask and weight 0 where none: fixed shapes, no gather of
        a data-dependent number of masks."""
        matched = assigned >= 0
        target_classes = torch.where(matched, assigned, self.num_classes)
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.empty_weight)
        index = assigned.clamp(min=0)[..., None].expand(-1, -1, masks.shape[-1])
        src, tgt = mask_logits.float().flatten(0, 1), masks.gather(1, index).flatten(0, 1)
        weight = matched.flatten().float()
        loss_mask = sigmoid_focal_loss(src, tgt, num_masks, weight=weight)
        loss_dice = dice_loss(src, tgt, num_masks, weight=weight)
        return {"loss_ce": self.class_weight * loss_ce, "loss_mask": self.mask_weight * loss_mask,
                "loss_dice": self.dice_weight * loss_dice}

    def forward(self, outputs: dict, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        layers = list(outputs.get("aux_outputs", [])) + [outputs]  # decoder order, final last
        size = outputs["pred_masks"].shape[-2:]
        small = F.interpolate(targets[:, None].float(), size=size, mode="nearest")[:, 0].long()
        with torch.autocast(targets.device.type, enabled=False):  # costs and losses in fp32
            masks, present = class_targets(small, self.num_classes)
            costs = torch.stack([pairwise_costs(
                out["pred_logits"], out["pred_masks"].flatten(2), masks,
                class_weight=self.class_weight, mask_weight=self.mask_weight,
                dice_weight=self.dice_weight) for out in layers])
            assigned, num_masks = match_on_host(costs, present)
            losses = {}
            for i, out in enumerate(layers):
                suffix = "" if i == len(layers) - 1 else f"_{i}"
                terms = self._layer_losses(out["pred_logits"], out["pred_masks"].flatten(2),
                                           assigned[i], masks, num_masks)
                losses.update({f"{k}{suffix}": v for k, v in terms.items()})
        return losses


# --------------------------------------------------------------------------------------------
# Pixel decoder and transformer decoder
# --------------------------------------------------------------------------------------------


def _conv_gn_relu(in_ch: int, out_ch: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.GroupNorm(math.gcd(32, out_ch), out_ch), nn.ReLU(inplace=True))


class PixelDecoder(nn.Module):
    """FPN over the backbone stages -> mask features ``[B, mask_dim, H/4, W/4]``."""

    def __init__(self, in_channels: list[int], conv_dim: int = 256, mask_dim: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(_conv_gn_relu(c, conv_dim, 1) for c in in_channels[:-1])
        self.top = _conv_gn_relu(in_channels[-1], conv_dim, 3)
        self.output = nn.ModuleList(_conv_gn_relu(conv_dim, conv_dim, 3) for _ in in_channels[:-1])
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = self.top(feats[-1])
        for i in range(len(feats) - 2, -1, -1):
            y = self.lateral[i](feats[i]) + F.interpolate(y, size=feats[i].shape[-2:], mode="nearest")
            y = self.output[i](y)
        return self.mask_features(y)


def sine_position_encoding(x: torch.Tensor, num_feats: int) -> torch.Tensor:
    """DETR's normalised sine encoding ``[B, 2 * num_feats, H, W]`` for a feature map ``x``."""
    b, _, h, w = x.shape
    y_embed = torch.arange(1, h + 1, device=x.device, dtype=torch.float32)[:, None].expand(h, w)
    x_embed = torch.arange(1, w + 1, device=x.device, dtype=torch.float32)[None, :].expand(h, w)
    scale, eps = 2 * math.pi, 1e-6
    y_embed = y_embed / (h + eps) * scale
    x_embed = x_embed / (w + eps) * scale
    dim_t = torch.arange(num_feats, device=x.device, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(2)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(2)
    return torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)[None].expand(b, -1, -1, -1)


class DecoderLayer(nn.Module):
    """DETR decoder layer (post-norm): self-attention, cross-attention with positional keys, FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(dim_feedforward, d_model))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, memory, query_pos, pos):
        q = tgt + query_pos
        tgt = self.norms[0](tgt + self.dropout(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attn = self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norms[1](tgt + self.dropout(attn))
        return self.norms[2](tgt + self.dropout(self.ffn(tgt)))


class MLP(nn.Sequential):
    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int = 3):
        dims = [in_dim] + [hidden] * (num_layers - 1)
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        super().__init__(*layers, nn.Linear(dims[-1], out_dim))


class TransformerPredictor(nn.Module):
    """Queries over the last backbone stage -> per-layer class logits and mask embeddings.

    Returns a list (one per decoder layer, last = final) of ``(class_logits [B, Q, C+1] for the
    training loss, learned class logits [B, Q, C+1] for prediction, mask_embed [B, Q, mask_dim])``.
    """

    def __init__(self, in_channels: int, num_classes: int, *, hidden_dim: int = 256,
                 num_queries: int = 100, nheads: int = 8, dim_feedforward: int = 2048,
                 dec_layers: int = 6, dropout: float = 0.1, mask_dim: int = 256,
                 class_head: nn.Module | None = None):
        super().__init__()
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, 1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, nheads, dim_feedforward, dropout)
                                    for _ in range(dec_layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.class_head = class_head or AdjustableClassHead(hidden_dim, num_classes)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.hidden_dim = hidden_dim

    def forward(self, x: torch.Tensor):
        b = x.shape[0]
        pos = sine_position_encoding(x, self.hidden_dim // 2).flatten(2).transpose(1, 2)
        memory = self.input_proj(x).flatten(2).transpose(1, 2)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        outs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, pos)
            h = self.norm(tgt)
            train_logits = self.class_head(h, adjust=True)
            learned = self.class_head(h, adjust=False) if self.class_head.adjusts else train_logits
            outs.append((train_logits, learned, self.mask_embed(h)))
        return outs


class AdjustableClassHead(nn.Module):
    """Class logits over ``C + 1``: the C real classes from a plain linear layer or the
    logit-adjusted cosine classifier; the no-object logit always from a plain linear layer."""

    def __init__(self, hidden_dim: int, num_classes: int, cosine: CosineClassifier | None = None):
        super().__init__()
        self.cosine = cosine
        self.linear = nn.Linear(hidden_dim, 1 if cosine is not None else num_classes + 1)
        self.adjusts = cosine is not None and cosine.tau != 0.0

    def forward(self, h: torch.Tensor, adjust: bool = False) -> torch.Tensor:
        if self.cosine is None:
            return self.linear(h)
        return torch.cat([self.cosine(h, adjust=adjust), self.linear(h)], dim=-1)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor,
                       normalize: bool = True) -> torch.Tensor:
    """``[B, Q, C+1]`` x ``[B, Q, H, W]`` -> ``[B, C, H, W]``: ``sum_q softmax(class)[:C] *
    sigmoid(mask)``, normalised per pixel to a class distribution unless ``normalize=False``."""
    probs = class_logits.float().softmax(-1)[..., :-1]
    scores = torch.einsum("bqc,bqhw->bchw", probs, mask_logits.float().sigmoid())
    if normalize:
        scores = scores / scores.sum(1, keepdim=True).clamp(min=1e-12)
    return scores


class MaskFormer(nn.Module):
    """Swin backbone + pixel decoder + transformer predictor + set criterion.

    The shared interface: ``forward(images, targets)`` -> loss terms; ``predict(images)`` ->
    per-pixel class distributions ``[B, C, H, W]`` at the input size; ``log_probs(images)``.
    """

    def __init__(self, backbone: SwinBackbone, num_classes: int, predictor: TransformerPredictor,
                 criterion: SetCriterion, *, mask_dim: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.pixel_decoder = PixelDecoder(backbone.channels, mask_dim, mask_dim)
        self.predictor = predictor
        self.criterion = criterion

    def _outputs(self, images: torch.Tensor):
        feats = self.backbone(images)
        mask_features = self.pixel_decoder(feats)
        layers = self.predictor(feats[-1])
        return [(train_logits, logits, torch.einsum("bqc,bchw->bqhw", embed, mask_features))
                for train_logits, logits, embed in layers]

    @staticmethod
    def _to_input(masks: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        full = F.interpolate(masks, size=(masks.shape[-2] * 4, masks.shape[-1] * 4),
                             mode="bilinear", align_corners=False)
        return full[..., :h, :w]

    def forward(self, images: torch.Tensor, targets: torch.Tensor, return_log_probs: bool = False):
        layers = self._outputs(images)
        train_logits, logits, masks = layers[-1]
        outputs = {"pred_logits": train_logits, "pred_masks": masks,
                   "aux_outputs": [{"pred_logits": t, "pred_masks": m} for t, _, m in layers[:-1]]}
        h, w = images.shape[-2:]
        ph, pw = (-h) % SIZE_DIVISOR, (-w) % SIZE_DIVISOR
        padded = F.pad(targets, (0, pw, 0, ph), value=IGNORE_INDEX)  # to the backbone's padding
        losses = self.criterion(outputs, padded)
        if not return_log_probs:
            return losses
        dist = semantic_inference(logits, self._to_input(masks, images))
        return losses, dist.clamp(min=1e-12).log()

    def predict(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        with torch.no_grad():
            _, logits, masks = self._outputs(images)[-1]
            return semantic_inference(logits, self._to_input(masks, images), normalize)

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        _, logits, masks = self._outputs(images)[-1]
        return semantic_inference(logits, self._to_input(masks, images)).clamp(min=1e-12).log()


def build_maskformer(cfg, num_classes: int, prior, backbone: SwinBackbone) -> MaskFormer:
    m, loss, la = cfg.model, cfg.loss, cfg.loss.logit_adjust
    cosine = None
    if la.enabled:
        cosine = CosineClassifier(m.hidden_dim, num_classes, prior=prior, tau=la.tau,
                                  init_scale=la.init_scale, channels_last=True)
    predictor = TransformerPredictor(
        backbone.channels[-1], num_classes, hidden_dim=m.hidden_dim, num_queries=m.num_queries,
        nheads=m.nheads, dim_feedforward=m.dim_feedforward, dec_layers=m.dec_layers,
        dropout=m.dec_dropout, mask_dim=m.mask_dim,
        class_head=AdjustableClassHead(m.hidden_dim, num_classes, cosine))
    criterion = SetCriterion(num_classes, no_object_weight=loss.no_object_weight,
                             class_weight=loss.class_weight, mask_weight=loss.mask_weight,
                             dice_weight=loss.dice_weight)
    return MaskFormer(backbone, num_classes, predictor, criterion, mask_dim=m.mask_dim)
