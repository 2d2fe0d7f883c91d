"""Training-sample throughput of one CPU core: VSPW-size frames (853x480 JPEG + PNG) through the
real augmentation pipeline (``TrainDataset``) at crop 640, and where the time goes.

Parts (each capped in time, one JSON line each as it ends):
  * ``dataset``: ``TrainDataset.__getitem__`` in this process, one torch thread: images/s of
    wall time and per CPU-second (the per-core rate, robust to other load on the machine);
  * ``stages``: CPU milliseconds per sample of decode (JPEG, PNG), resize, crop, flip,
    photometric distortion, normalise and pad -- the same functions, called one by one;
  * ``loader``: a ``DataLoader`` as the trainer builds it (``--workers`` processes, persistent,
    batches of 8) for the end-to-end rate with collation and inter-process copies.
Then the loader cores one GPU needs at the issue's step rates (Swin-L UperNet crop 640: 46.3
img/s compiled as measured on an H200, 62 img/s the target; MaskFormer's target is the same).

Usage: ``python benchmarks/loader_throughput.py [--root VSPW_ROOT] [--samples 60]``; without
``--root`` it writes the synthetic set of ``vspw-ray data synth OUT --videos 4 --frames 10
--size 480x853`` to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEP_RATES = {"upernet_compiled_h200": 46.3, "target": 62.0}  # img/s per GPU, issue 18


def emit(metric: str, value, unit: str, target=None, **extra) -> None:
    print(json.dumps({"metric": metric, "value": value if value is None else round(value, 3),
                      "target": target, "unit": unit, **extra}), flush=True)


def frames_and_config(root: str | None, crop: int):
    from vspw_ray.config import DataConfig
    from vspw_ray.data import split_frames
    from vspw_ray.data.synth import SynthSpec, synthesize

    if root is None:
        root = tempfile.mkdtemp(prefix="loader-bench-")
        synthesize(root, SynthSpec(videos=4, frames=10, height=480, width=853))
    frames = [f for split in ("train", "val", "test") for f in split_frames(root, split)]
    frames = [f for f in frames if f.mask is not None]
    return frames, DataConfig(root=root, crop_size=(crop, crop))


def part_dataset(frames, cfg, samples: int, cap_s: float) -> float:
    from vspw_ray.data.datasets import TrainDataset

    dataset = TrainDataset(frames, 124, cfg)
    dataset[(0, 0)]  # imports and first-touch costs stay out of the rate
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    while n < samples and time.perf_counter() - wall < cap_s:
        dataset[(n % len(frames), n)]
        n += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    emit("loader_images_per_s_wall", n / wall, "img/s", samples=n)
    emit("loader_images_per_cpu_s", n / cpu, "img/s per core", samples=n)
    return n / cpu


def _stage_times(frames, cfg, samples: int, cap_s: float) -> tuple[dict[str, float], int]:
    import numpy as np
    import torch

    from vspw_ray.data import label_lut, read_image, read_mask
    from vspw_ray.data import transforms as T

    lut, times, start, n = label_lut(124), {}, time.perf_counter(), 0

    def timed(name, fn, *args):
        t = time.process_time()
        out = fn(*args)
        times[name] = times.get(name, 0.0) + time.process_time() - t
        return out

    while n < samples and time.perf_counter() - start < cap_s:
        frame, rng = frames[n % len(frames)], np.random.default_rng(n)
        img = timed("decode_jpeg", read_image, frame)
        mask = timed("decode_png", read_mask, frame, lut)
        img, mask = timed("resize", T.random_resize, img, mask, rng, cfg.ratio_range, cfg.base_size)
        img, mask = timed("crop", T.random_crop, img, mask, rng, cfg.crop_size, cfg.cat_max_ratio)
        if rng.random() < cfg.flip_prob:
            img, mask = timed("flip", T.hflip, img, mask)
        img = timed("photometric", T.photometric_distortion, img, rng)
        image = timed("normalize", T.normalize, img, cfg.mean, cfg.std)
        target = torch.from_numpy(np.array(mask, dtype=np.int64))
        timed("pad", T.pad_to, image, target, cfg.crop_size)
        n += 1
    return times, n


def part_stages(frames, cfg, samples: int, cap_s: float) -> None:
    times, n = _stage_times(frames, cfg, samples, cap_s)
    for name, seconds in times.items():
        emit(f"loader_stage_{name}_ms", 1000 * seconds / n, "CPU ms per sample", samples=n)


def part_loader(frames, cfg, samples: int, workers: int, cap_s: float) -> None:
    import torch

    from vspw_ray.data.datasets import IterationSampler, TrainDataset

    batch = 8
    sampler = IterationSampler(len(frames), batch, seed=0, num_iters=math.ceil(samples / batch) + 2)
    loader = torch.utils.data.DataLoader(TrainDataset(frames, 124, cfg), batch_size=batch,
                                         sampler=sampler, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    it = iter(loader)
    next(it)  # worker start-up stays out of the rate
    start, n = time.perf_counter(), 0
    for b in it:
        n += b["image"].shape[0]
        if n >= samples or time.perf_counter() - start > cap_s:
            break
    emit("loader_dataloader_images_per_s", n / (time.perf_counter() - start), "img/s",
         workers=workers, batch=batch, samples=n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None)
    p.add_argument("--samples", type=int, default=60)
    p.add_argument("--crop", type=int, default=640)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--part-seconds", type=float, default=60.0, help="cap of each part")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # as a loader worker process runs
    frames, cfg = frames_and_config(args.root, args.crop)
    per_core = part_dataset(frames, cfg, args.samples, args.part_seconds)
    part_stages(frames, cfg, args.samples, args.part_seconds)
    part_loader(frames, cfg, args.samples, args.workers, args.part_seconds)
    for name, rate in STEP_RATES.items():
        emit(f"loader_cores_per_gpu_at_{name}", rate / per_core, "cores", step_img_per_s=rate,
             per_core_img_per_s=round(per_core, 2))


if __name__ == "__main__":
    main()
