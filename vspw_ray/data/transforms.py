"""Training augmentations of the seed baselines (mmsegmentation's ADE20K/VSPW pipeline).

Order as in mmseg: random resize by a ratio -> random crop with a maximum single-class share ->
horizontal flip -> photometric distortion -> normalise -> pad to the crop with 0 (image) and 255
(mask). Images are ``[H, W, 3]`` uint8 and masks ``[H, W]`` uint8 reduced ids until normalised.
Every random draw comes from the ``numpy.random.Generator`` passed in, so a sample is a pure
function of its seed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vspw_ray.data.layout import IGNORE_INDEX

__all__ = [
    "random_resize",
    "random_crop",
    "hflip",
    "photometric_distortion",
    "normalize",
    "pad_to",
    "train_transform",
]


def _resize(img: np.ndarray, mask: np.ndarray, size_hw: tuple[int, int]):
    h, w = size_hw
    img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return img, mask


def random_resize(img, mask, rng: np.random.Generator, ratio_range=(0.5, 2.0), base_size=None):
    """Resize by a ratio drawn uniformly from ``ratio_range``, keeping the aspect ratio.

    ``base_size`` (h, w) None scales the frame's own size; otherwise the frame is first fitted
    into ``base_size * ratio`` as mmseg's ``Resize(img_scale, ratio_range, keep_ratio=True)``.
    """
    ratio = rng.uniform(*ratio_range)
    h, w = mask.shape
    if base_size is None:
        scale = ratio
    else:
        long_side, short_side = max(base_size) * ratio, min(base_size) * ratio
        scale = min(long_side / max(h, w), short_side / min(h, w))
    new = (max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5)))
    return _resize(img, mask, new)


def random_crop(img, mask, rng: np.random.Generator, crop_size, cat_max_ratio=0.75, tries=10):
    """Random crop of at most ``crop_size``; retried up to ``tries`` times while one class takes
    more than ``cat_max_ratio`` of the labelled pixels (mmseg's RandomCrop)."""
    ch, cw = crop_size
    h, w = mask.shape

    def draw():
        y = int(rng.integers(0, max(h - ch, 0) + 1))
        x = int(rng.integers(0, max(w - cw, 0) + 1))
        return y, x

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            counts = np.bincount(mask[y : y + ch, x : x + cw].ravel(), minlength=256)
            counts = counts[np.arange(256) != IGNORE_INDEX]
            counts = counts[counts > 0]  # as np.unique's, in a linear pass instead of a sort
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return img[y : y + ch, x : x + cw], mask[y : y + ch, x : x + cw]


def hflip(img, mask):
    return img[:, ::-1], mask[:, ::-1]


def _table(values: np.ndarray) -> list[int]:
    """float32 ``[256]`` channel values -> a uint8 lookup table as the per-pixel code rounded
    them (clip to 0..255, truncate)."""
    return np.clip(values, 0, 255).astype(np.uint8).tolist()


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion: brightness (+-32), contrast (0.5-1.5) before or after
    saturation (0.5-1.5) and hue (+-18 of 180 degrees), each applied with probability 0.5.

    Every step but the HSV conversion maps each channel value on its own, so each runs as a
    256-entry table (PIL ``point``) built with the float32 arithmetic a per-pixel version would
    do on every pixel: the same bytes, about a fifth less time per sample; the two HSV
    conversions are what remains (benchmarks/loader_throughput.py).
    """
    value = np.arange(256, dtype=np.float32)  # what each uint8 channel value becomes
    if rng.integers(2):
        value += rng.uniform(-32, 32)
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        value *= rng.uniform(0.5, 1.5)
    do_sat, do_hue = rng.integers(2), rng.integers(2)
    sat, hue = rng.uniform(0.5, 1.5), int(rng.integers(-18, 19))
    image = Image.fromarray(img)
    if do_sat or do_hue:
        hsv = image.point(_table(value) * 3).convert("HSV")
        h, s, v = (np.arange(256, dtype=np.float32) for _ in range(3))
        if do_sat:
            s *= sat
        if do_hue:  # PIL's hue runs 0..255 for 0..360 degrees; mmseg's delta is of 180
            h = (h + hue * 256.0 / 180.0) % 256.0
        image = hsv.point(_table(h) + _table(s) + _table(v)).convert("RGB")
        value = np.arange(256, dtype=np.float32)
    if not contrast_first and rng.integers(2):
        value *= rng.uniform(0.5, 1.5)
    return np.array(image.point(_table(value) * 3))


def normalize(img: np.ndarray, mean, std) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` float32 ``(img - mean) / std``."""
    # one strided pass to contiguous [3, H, W] float32, then in place (the same float32 ops)
    t = torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1),
                                              dtype=np.float32))
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return t.sub_(mean_t).div_(std_t)


def pad_to(image: torch.Tensor, mask: torch.Tensor, size_hw: tuple[int, int]):
    """Pad bottom/right to ``size_hw``: image with 0 (the mean after normalising), mask with 255."""
    h, w = mask.shape
    ph, pw = max(size_hw[0] - h, 0), max(size_hw[1] - w, 0)
    if ph or pw:
        image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.0)
        mask = torch.nn.functional.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
    return image, mask


def train_transform(img, mask, rng: np.random.Generator, *, crop_size, ratio_range=(0.5, 2.0),
                    base_size=None, cat_max_ratio=0.75, flip_prob=0.5, photometric=True,
                    mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)):
    """One augmented training sample: ``image [3, ch, cw]`` float32, ``mask [ch, cw]`` int64."""
    img, mask = random_resize(img, mask, rng, ratio_range, base_size)
    img, mask = random_crop(img, mask, rng, crop_size, cat_max_ratio)
    if rng.random() < flip_prob:
        img, mask = hflip(img, mask)
    if photometric:
        img = photometric_distortion(img, rng)
    image = normalize(img, mean, std)
    target = torch.from_numpy(np.array(mask, dtype=np.int64))
    return pad_to(image, target, crop_size)
