"""PyTorch datasets and the iteration-based sampler used by training and evaluation.

Training is counted in iterations, as in the seed. :class:`IterationSampler` lays the frames of
the split out as an endless stream of seeded permutations; iteration ``it`` takes the global
batch at positions ``[it * B, (it + 1) * B)`` and worker ``rank`` takes its share of those slots.
Each sample also carries an augmentation seed derived from ``(seed, iteration, slot)``, so the
data a run sees is a pure function of the seed and the iteration: resuming at iteration ``k``
sees exactly what an uninterrupted run would, and the global batch does not depend on the number
of workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vspw_ray.data.layout import (
    DataError,
    Frame,
    check_same_size,
    label_lut,
    read_image,
    read_mask,
    read_raw_mask,
    reduce_mask,
)
from vspw_ray.data.transforms import normalize, train_transform

if TYPE_CHECKING:  # annotations only: the data layer does not import the config at run time
    from vspw_ray.config import DataConfig

__all__ = ["IterationSampler", "TrainDataset", "EvalDataset", "sample_seed"]

log = logging.getLogger(__name__)


def sample_seed(seed: int, iteration: int, slot: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, slot]).generate_state(1)[0])


class IterationSampler(Sampler):
    """Yields ``(frame_index, aug_seed)`` for one worker, iteration by iteration."""

    def __init__(self, num_frames: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_iter: int = 0, num_iters: int | None = None):
        if num_frames <= 0:
            raise ValueError("the training split has no frames")
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} does not divide by {world_size} workers")
        self.num_frames, self.batch_size = num_frames, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_iter, self.num_iters = start_iter, num_iters
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_frames)
            self._perm_epoch = epoch
        return self._perm

    def __len__(self) -> int:
        if self.num_iters is None:
            raise TypeError("an endless IterationSampler has no length")
        return (self.num_iters - self.start_iter) * self.batch_size // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        per_rank = self.batch_size // self.world_size
        it = self.start_iter
        while self.num_iters is None or it < self.num_iters:
            for slot in range(self.rank * per_rank, (self.rank + 1) * per_rank):
                epoch, pos = divmod(it * self.batch_size + slot, self.num_frames)
                yield int(self._permutation(epoch)[pos]), sample_seed(self.seed, it, slot)
            it += 1


class TrainDataset(Dataset):
    """Augmented training crops, indexed by ``(frame_index, aug_seed)`` from the sampler.

    Returns ``{"image": [3, ch, cw] float32, "mask": [ch, cw] int64}``. A frame that cannot be
    read raises :class:`DataError` naming it; with ``skip_bad_frames`` it is logged and the next
    frame is used instead.
    """

    def __init__(self, frames: Sequence[Frame], num_classes: int, cfg: DataConfig):
        self.frames, self.cfg = list(frames), cfg
        self.lut = label_lut(num_classes)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        for attempt in range(len(self.frames)):
            frame = self.frames[(index + attempt) % len(self.frames)]
            try:
                img, mask = read_image(frame), read_mask(frame, self.lut)
                check_same_size(frame, img, mask)
                break
            except DataError as err:
                if not self.cfg.skip_bad_frames:
                    raise
                log.warning("skipping bad frame (data.skip_bad_frames=true): %s", err)
        else:
            raise DataError("every training frame failed to load")
        c = self.cfg
        image, target = train_transform(
            img, mask, np.random.default_rng(seed), crop_size=c.crop_size,
            ratio_range=c.ratio_range, base_size=c.base_size, cat_max_ratio=c.cat_max_ratio,
            flip_prob=c.flip_prob, photometric=c.photometric, mean=c.mean, std=c.std)
        return {"image": image, "mask": target}


class EvalDataset(Dataset):
    """Whole frames at their original size, in order.

    Returns ``{"image": [3, H, W] float32, "mask": [H, W] int64 (only when the frame has one),
    "raw_mask": [H, W] uint8 (ditto), "video": str, "frame": str, "index": int}``.
    """

    def __init__(self, frames: Sequence[Frame], num_classes: int, cfg: DataConfig):
        self.frames, self.cfg = list(frames), cfg
        self.lut = label_lut(num_classes)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict:
        frame = self.frames[index]
        img = read_image(frame)
        out = {"image": normalize(img, self.cfg.mean, self.cfg.std), "video": frame.video,
               "frame": frame.name, "index": index}
        if frame.mask is not None:
            raw = read_raw_mask(frame)
            check_same_size(frame, img, raw)
            out["mask"] = torch.from_numpy(reduce_mask(raw, self.lut, frame)).long()
            out["raw_mask"] = torch.from_numpy(raw.copy())
        return out
