"""timm Swin as a segmentation backbone, with local pretrained weights.

Any timm Swin name works, from ``swin_tiny_patch4_window7_224`` to the seed's
``swin_large_patch4_window12_384``; ``backbone_kwargs`` (``embed_dim``, ``depths``,
``num_heads``, ``window_size``) shrink it for tests. The input size is free: timm builds the
shifted-window masks per forward (``dynamic_img_size``), and :class:`SwinBackbone` pads the
input to a multiple of 32 so every stage has an integral size.
"""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwinBackbone", "load_swin_state_dict", "read_checkpoint_file"]

SIZE_DIVISOR = 32  # patch 4 x three 2x patch mergings


class SwinBackbone(nn.Module):
    """Four NCHW feature maps at strides 4, 8, 16, 32, each behind a LayerNorm (as the Swin
    segmentation baselines add one per output).

    Args:
        x: ``[B, 3, H, W]`` normalised images, any H and W.
    Returns:
        list of ``[B, C_i, ceil(H'/s_i), ceil(W'/s_i)]`` where H', W' are padded to 32.
    """

    def __init__(self, name: str, *, drop_path_rate: float = 0.3, pretrained: str | None = None,
                 **kwargs):
        super().__init__()
        self.name = name
        self.kwargs = dict(kwargs)
        self.body = timm.create_model(name, pretrained=False, features_only=True,
                                      dynamic_img_size=True, drop_path_rate=drop_path_rate,
                                      **kwargs)
        self.channels = list(self.body.feature_info.channels())
        self.strides = list(self.body.feature_info.reduction())
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels)
        if pretrained:
            load_swin_state_dict(self, pretrained)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        ph, pw = (-h) % SIZE_DIVISOR, (-w) % SIZE_DIVISOR
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.body(x)  # timm returns Swin features NHWC
        return [norm(f).permute(0, 3, 1, 2).contiguous() for norm, f in zip(self.norms, feats)]


def read_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file (loaded with
    ``weights_only=True``), unwrapped from ``model``/``state_dict`` keys as release checkpoints
    nest it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} do not exist (model.pretrained); "
                                f"nothing is downloaded: put the file there or set it to null")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises several types here
            raise ValueError(f"cannot read pretrained weights {path}: {err}") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return sd


def load_swin_state_dict(backbone: SwinBackbone, path: str | Path) -> None:
    """Load timm-format or original Microsoft Swin weights into ``backbone``.

    Microsoft's release checkpoints keep the patch merging at the end of each stage and name the
    classifier ``head``; timm's ``checkpoint_filter_fn`` converts them (and resizes relative
    position tables and patch embeddings when the window or patch differ). The classifier and
    final norm are dropped; any other missing or unexpected key is an error naming the file.
    """
    from timm.models.swin_transformer import checkpoint_filter_fn

    sd = read_checkpoint_file(path)
    sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    # checkpoint_filter_fn reads shapes and window sizes off a full model: build one on meta
    with torch.device("meta"):
        reference = timm.create_model(backbone.name, pretrained=False, num_classes=0,
                                      dynamic_img_size=True, **backbone.kwargs)
    converted = checkpoint_filter_fn(sd, reference)
    target = backbone.body.state_dict()
    mapped, unexpected = {}, []
    for key, value in converted.items():
        if key.startswith(("head.", "norm.")):
            continue  # classifier and final norm: not part of a segmentation backbone
        new_key = re.sub(r"^layers\.(\d+)\.", r"layers_\1.", key)
        if new_key in target:
            mapped[new_key] = value
        else:
            unexpected.append(key)
    missing = [k for k in target if k not in mapped and not k.endswith("attn_mask")
               and not k.endswith("relative_position_index")]
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items()
                   if v.shape != target[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys, e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys, e.g. {unexpected[:5]}")
        if wrong_shape:
            parts.append(f"mismatched shapes: {wrong_shape[:5]}")
        raise ValueError(f"pretrained weights {path} do not fit backbone '{backbone.name}' "
                         f"{backbone.kwargs or ''}: " + "; ".join(parts)
                         + ". Check model.backbone and model.backbone_kwargs against the file.")
    backbone.body.load_state_dict(mapped, strict=False)
