"""`vspw-ray data check`: find every problem in a VSPW-layout dataset, with its video and frame.

Checks the class table, the split files, and for every video of the chosen splits: frames
present, each image fully decodable (a truncated JPEG included), each mask present (test videos
may come without a mask folder), readable, 8-bit, of the image's size and holding only labels of
the class table (0..C and 255). Videos are checked in parallel processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vspw_ray.data.layout import (
    IMAGE_EXTS,
    DataError,
    label_lut,
    load_class_table,
    read_split,
)
from vspw_ray.parallel import map_videos

__all__ = ["Problem", "check_dataset", "check_video", "available_splits"]


@dataclass(frozen=True)
class Problem:
    where: str  # "split file", "<video>", or "<video>/<frame>"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def available_splits(root: str | Path) -> list[str]:
    return [s for s in ("train", "val", "test") if (Path(root) / f"{s}.txt").is_file()]


def _check_frame(video: str, stem: str, image: Path, mask: Path | None, lut: np.ndarray):
    where = f"{video}/{stem}"
    size = None
    try:
        with Image.open(image) as im:
            im.load()
            size = im.size
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad frame
        yield Problem(where, f"image {image} cannot be decoded: {err}")
    if mask is None:
        return
    try:
        with Image.open(mask) as im:
            im.load()
            mode, msize, values = im.mode, im.size, np.asarray(im)
    except Exception as err:  # noqa: BLE001
        yield Problem(where, f"mask {mask} cannot be decoded: {err}")
        return
    if mode not in ("P", "L"):
        yield Problem(where, f"mask {mask} has mode {mode}; expected 8-bit palette (P) or gray (L)")
        return
    if size is not None and msize != size:
        yield Problem(where, f"mask is {msize[0]}x{msize[1]} but the image is {size[0]}x{size[1]}")
    present = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    bad = [int(v) for v in present if lut[v] < 0]
    if bad:
        yield Problem(where, f"mask holds label values {bad[:10]} outside the class table "
                             f"(valid: 0..{int((lut >= 0).sum()) - 2} and 255)")


def check_video(root: str | Path, video: str, num_classes: int, masks_optional: bool = False):
    """All problems of one video (a list, empty when clean)."""
    vdir = Path(root) / "data" / video
    origin, mask_dir = vdir / "origin", vdir / "mask"
    if not vdir.is_dir():
        return [Problem(video, f"video folder {vdir} does not exist")]
    if not origin.is_dir():
        return [Problem(video, f"frame folder {origin} does not exist")]
    images = {p.stem: p for p in sorted(origin.iterdir()) if p.suffix.lower() in IMAGE_EXTS}
    if not images:
        return [Problem(video, f"video is empty: no frames in {origin}")]
    has_masks = mask_dir.is_dir()
    problems = []
    if not has_masks and not masks_optional:
        problems.append(Problem(video, f"mask folder {mask_dir} does not exist"))
    masks = {p.stem: p for p in mask_dir.glob("*.png")} if has_masks else {}
    lut = label_lut(num_classes)
    for stem, image in images.items():
        mask = masks.get(stem)
        if mask is None and has_masks:
            problems.append(Problem(f"{video}/{stem}", f"mask {mask_dir / (stem + '.png')} is missing"))
        problems.extend(_check_frame(video, stem, image, mask, lut))
    for stem in sorted(set(masks) - set(images)):
        problems.append(Problem(f"{video}/{stem}", f"mask {masks[stem]} has no frame in {origin}"))
    return problems


def check_dataset(root: str | Path, splits: Sequence[str] | None = None, *,
                  processes: int | None = None, progress=None) -> list[Problem]:
    """Check the class table, split files and every video of ``splits`` (default: all present).

    ``progress(done, total)`` is called after each video. Returns the problems in video order.
    """
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "dataset root does not exist")]
    try:
        num_classes = load_class_table(root).num_classes
    except DataError as err:
        return [Problem("class table", str(err))]
    splits = list(splits or available_splits(root))
    if not splits:
        return [Problem(str(root), "no split files (train.txt, val.txt, test.txt) found")]
    problems, jobs = [], []
    for split in splits:
        try:
            videos = read_split(root, split)
        except DataError as err:
            problems.append(Problem(f"split '{split}'", str(err)))
            continue
        if not videos:
            problems.append(Problem(f"split '{split}'", f"{root / (split + '.txt')} lists no videos"))
        for video in videos:
            if not (root / "data" / video).is_dir():
                problems.append(Problem(video, f"listed in {split}.txt but {root / 'data' / video} "
                                               f"does not exist"))
            else:
                jobs.append((str(root), video, num_classes, split == "test"))
    for found in map_videos(check_video, jobs, processes=processes, progress=progress):
        problems.extend(found)
    return problems
