"""Dataset fingerprint time on a VSPW-sized listing, and its share of a `vspw-ray data check`.

The listing has VSPW's shape: 3,536 videos (2,806 train, 343 val, 387 test), 251,056 frames
(71 per video), a JPEG per frame and a PNG mask per train/val frame, as tiny files of varied
sizes (the fingerprint reads names and sizes, never the bytes, so content does not matter;
~502k files). The fingerprint of every split is timed with its cache off, three times on a
warm page cache (the best is reported; the first after writing is cold-ish).

A data check decodes every frame and mask, so it cannot run on tiny files: its per-frame cost
is measured on real-size frames (853x480 JPEGs with 124-class palette masks, 6 videos x 10
frames, every core, as `vspw-ray data check` runs) and scaled to the listing's frame count.

    python benchmarks/fingerprint.py [--listing DIR] [--keep]

Prints JSON lines last: {"metric", "value", "target", "unit"}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vspw_ray.data.check import check_dataset  # noqa: E402
from vspw_ray.data.fingerprint import data_fingerprint  # noqa: E402

SPLITS = {"train": 2806, "val": 343, "test": 387}  # VSPW's videos per split
FRAMES_PER_VIDEO = 71  # 3,536 x 71 = 251,056 frames
CLASSES = 124


def _class_table(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    table = {"others": 0, **{f"class_{c:03d}": c for c in range(1, CLASSES + 1)}}
    (root / "label_num_dic_final.json").write_text(json.dumps(table))


def make_listing(root: Path) -> int:
    """The VSPW-shaped listing of tiny files under ``root``; returns its frame count."""
    _class_table(root)
    frames, start = 0, 0
    for split, count in SPLITS.items():
        names = [f"video_{i:05d}" for i in range(start, start + count)]
        start += count
        (root / f"{split}.txt").write_text("".join(f"{v}\n" for v in names))
        for v, name in enumerate(names):
            subs = ("origin", "mask") if split != "test" else ("origin",)
            for sub in subs:
                folder = root / "data" / name / sub
                folder.mkdir(parents=True)
                ext = ".jpg" if sub == "origin" else ".png"
                for t in range(FRAMES_PER_VIDEO):
                    (folder / f"{t:08d}{ext}").write_bytes(b"x" * ((v * 31 + t * 7) % 97 + 1))
            frames += FRAMES_PER_VIDEO
    return frames


def time_fingerprint(root: Path, repeats: int = 3) -> tuple[float, str]:
    times, fp = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        fp = data_fingerprint(root, tuple(SPLITS), cached=False)
        times.append(time.perf_counter() - start)
    print(f"fingerprint {fp}: " + ", ".join(f"{t:.2f} s" for t in times))
    return min(times), fp


def _real_frames(root: Path, videos: int = 6, frames: int = 10) -> int:
    """853x480 JPEG frames and palette masks of 124 classes, VSPW's format."""
    _class_table(root)
    rng = np.random.default_rng(0)
    names = [f"real_{i:03d}" for i in range(videos)]
    (root / "val.txt").write_text("".join(f"{v}\n" for v in names))
    yy, xx = np.mgrid[0:480, 0:853]
    for name in names:
        (root / "data" / name / "origin").mkdir(parents=True)
        (root / "data" / name / "mask").mkdir(parents=True)
        for t in range(frames):
            phase = rng.uniform(0, 6.28, 3)
            image = np.stack([127 + 120 * np.sin(xx / (40 + 9 * c) + yy / 57 + phase[c])
                              for c in range(3)], -1).astype(np.uint8)
            image = np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "data" / name / "origin" / f"{t:08d}.jpg",
                                        quality=90)
            mask = ((xx // 107 + yy // 96 * 8 + t) % CLASSES + 1).astype(np.uint8)
            Image.fromarray(mask, mode="L").convert("P").save(
                root / "data" / name / "mask" / f"{t:08d}.png")
    return videos * frames


def time_check_per_frame(work: Path) -> float:
    root = work / "real"
    n = _real_frames(root)
    start = time.perf_counter()
    problems = check_dataset(root, ["val"])
    seconds = time.perf_counter() - start
    assert not problems, problems[:3]
    print(f"data check of {n} real-size frames ({os.cpu_count()} processes): {seconds:.2f} s, "
          f"{1000 * seconds / n:.1f} ms per frame")
    return seconds / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--listing", help="where to write the listing (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the listing for a re-run")
    args = parser.parse_args()
    work = Path(args.listing or tempfile.mkdtemp(prefix="vspw-fingerprint-"))
    listing = work / "listing"
    try:
        if not (listing / "val.txt").is_file():
            start = time.perf_counter()
            frames = make_listing(listing)
            print(f"wrote the listing ({frames} frames) in {time.perf_counter() - start:.0f} s")
        frames = sum(SPLITS.values()) * FRAMES_PER_VIDEO
        fp_s, _ = time_fingerprint(listing)
        per_frame = time_check_per_frame(work)
        check_s = per_frame * frames
        share = 100 * fp_s / check_s
        print(f"data check of {frames} frames at that rate: {check_s / 60:.1f} min; "
              f"the fingerprint is {share:.3f} % of it")
    finally:
        shutil.rmtree(work / "real", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for metric, value, target, unit in [
        ("fingerprint_s_251k_frames", fp_s, 10.0, "s"),
        ("fingerprint_share_of_data_check", share, 1.0, "%"),
        ("data_check_ms_per_frame", 1000 * per_frame, None, "ms"),
    ]:
        print(json.dumps({"metric": metric, "value": round(value, 4), "target": target,
                          "unit": unit}))


if __name__ == "__main__":
    main()
