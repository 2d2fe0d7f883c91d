"""The VSPW_480p layout: class table, split files, videos, frames, folds and label mapping.

```
ROOT/label_num_dic_final.json      {"others": 0, "wall": 1, ..., "<class C>": C}
ROOT/train.txt | val.txt | test.txt  one video name per line
ROOT/data/<video>/origin/<frame>.jpg
ROOT/data/<video>/mask/<frame>.png   raw ids: 0 "others" and 255 void are ignored
```
Training and metrics use reduced ids: raw ``1..C`` become ``0..C-1``; raw ``0`` and ``255``
become the ignore index ``255``. Any other raw value is an error naming the video and frame.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vspw_ray.errors import DataError

IGNORE_INDEX = 255
CLASS_TABLE_FILE = "label_num_dic_final.json"
IMAGE_EXTS = (".jpg", ".jpeg", ".png")

__all__ = [
    "IGNORE_INDEX",
    "ClassTable",
    "DataError",
    "Frame",
    "load_class_table",
    "read_split",
    "list_frames",
    "split_frames",
    "split_folds",
    "fold_videos",
    "label_lut",
    "read_image",
    "read_raw_mask",
    "reduce_mask",
    "read_mask",
    "check_same_size",
]


@dataclass(frozen=True)
class ClassTable:
    """Class names in reduced-id order (reduced id ``i`` is raw id ``i + 1``)."""

    names: tuple[str, ...]
    ignored_name: str = "others"

    @property
    def num_classes(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Frame:
    video: str
    name: str  # file stem, e.g. "00000123"
    image: Path
    mask: Path | None

    @property
    def key(self) -> str:
        return f"{self.video}/{self.name}"


def load_class_table(root: str | Path) -> ClassTable:
    path = Path(root) / CLASS_TABLE_FILE
    if not path.is_file():
        raise DataError(f"{path} is missing: a VSPW-layout root needs its class table "
                        f"(name -> raw id, with 'others': 0)")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
        raise DataError(f"{path} must map class names to integer raw ids")
    by_id = {v: k for k, v in table.items()}
    ids = sorted(by_id)
    start = 0 if ids and ids[0] == 0 else 1
    if not ids or ids != list(range(start, start + len(ids))) or len(by_id) != len(table):
        raise DataError(f"{path}: raw ids must be distinct and contiguous from 0 (or 1), got {ids}")
    if ids[-1] >= IGNORE_INDEX:
        raise DataError(f"{path}: at most 254 classes fit the 8-bit masks, got raw id {ids[-1]}")
    ignored = by_id.get(0, "others")
    return ClassTable(names=tuple(by_id[i] for i in ids if i != 0), ignored_name=ignored)


def read_split(root: str | Path, split: str) -> list[str]:
    """Video names listed in ``ROOT/<split>.txt``, in file order, blank lines skipped."""
    path = Path(root) / f"{split}.txt"
    if not path.is_file():
        have = sorted(p.stem for p in Path(root).glob("*.txt"))
        raise DataError(f"split file {path} does not exist (splits here: {have or 'none'})")
    videos = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    dupes = sorted({v for v in videos if videos.count(v) > 1})
    if dupes:
        raise DataError(f"{path} lists videos more than once: {dupes[:5]}")
    return videos


def list_frames(root: str | Path, video: str, *, require_masks: bool = True) -> list[Frame]:
    """Frames of one video in name order. With ``require_masks`` every frame needs its mask."""
    vdir = Path(root) / "data" / video
    origin, mask_dir = vdir / "origin", vdir / "mask"
    if not origin.is_dir():
        raise DataError(f"video '{video}': {origin} does not exist")
    images = sorted(p for p in origin.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise DataError(f"video '{video}' has no frames in {origin}")
    frames = []
    for img in images:
        mask = mask_dir / f"{img.stem}.png"
        if not mask.is_file():
            if require_masks:
                raise DataError(f"video '{video}' frame '{img.stem}': mask {mask} is missing")
            mask = None
        frames.append(Frame(video, img.stem, img, mask))
    return frames


def split_frames(root: str | Path, split: str, *, require_masks: bool = True,
                 videos: Sequence[str] | None = None) -> list[Frame]:
    """All frames of a split (or of the given subset of its videos), video by video."""
    names = read_split(root, split) if videos is None else list(videos)
    return [f for v in names for f in list_frames(root, v, require_masks=require_masks)]


def split_folds(videos: Sequence[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """Split videos into disjoint folds A and B of sizes ceil(n/2) and floor(n/2).

    Videos are ordered by a hash of ``(seed, name)``, so the assignment depends only on the
    names and the seed, not on the order of the split file. Each fold keeps the input order.
    """
    ranked = sorted(videos, key=lambda v: hashlib.sha256(f"{seed}:{v}".encode()).hexdigest())
    in_a = set(ranked[: (len(ranked) + 1) // 2])
    return [v for v in videos if v in in_a], [v for v in videos if v not in in_a]


def fold_videos(videos: Sequence[str], fold: str | None, seed: int = 0) -> list[str]:
    """``fold`` None or "all": every video; "A"/"B": that fold."""
    if fold is None or fold.lower() == "all":
        return list(videos)
    a, b = split_folds(videos, seed)
    if fold.upper() == "A":
        return a
    if fold.upper() == "B":
        return b
    raise ValueError(f"fold must be A, B or all, got '{fold}'")


def label_lut(num_classes: int) -> np.ndarray:
    """Raw id -> reduced id lookup (256 entries, int16).

    Entries for raw ids above ``num_classes`` (other than 255) hold ``-1`` so callers can detect
    out-of-table labels instead of mislabelling them.
    """
    lut = np.full(256, -1, dtype=np.int16)
    lut[0] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    lut[1 : num_classes + 1] = np.arange(num_classes)
    return lut


def read_image(frame: Frame) -> np.ndarray:
    """RGB frame ``[H, W, 3]`` uint8; a missing, unreadable or truncated file is a DataError."""
    try:
        with Image.open(frame.image) as im:
            im.load()  # decodes fully: a truncated JPEG raises here
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"video '{frame.video}' frame '{frame.name}': cannot read image "
                        f"{frame.image}: {err}") from None


def read_raw_mask(frame: Frame) -> np.ndarray:
    """Raw mask ``[H, W]`` uint8 as stored (VSPW palette indices)."""
    if frame.mask is None:
        raise DataError(f"video '{frame.video}' frame '{frame.name}' has no mask")
    try:
        with Image.open(frame.mask) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise DataError(f"video '{frame.video}' frame '{frame.name}': mask {frame.mask} "
                                f"has mode {im.mode}; VSPW masks are 8-bit palette (P) or gray (L)")
            return np.asarray(im)
    except (OSError, SyntaxError) as err:
        raise DataError(f"video '{frame.video}' frame '{frame.name}': cannot read mask "
                        f"{frame.mask}: {err}") from None


def reduce_mask(raw: np.ndarray, lut: np.ndarray, frame: Frame | None = None) -> np.ndarray:
    """Map raw ids to reduced ids; raw values outside the class table are a DataError."""
    reduced = lut[raw]
    if (reduced < 0).any():
        bad = np.unique(raw[reduced < 0])
        where = f"video '{frame.video}' frame '{frame.name}': " if frame else ""
        num_classes = int((lut >= 0).sum()) - 2
        raise DataError(f"{where}mask holds label values {bad.tolist()[:10]} outside the class "
                        f"table (valid: 0..{num_classes} and 255)")
    return reduced.astype(np.uint8)


def check_same_size(frame: Frame, image: np.ndarray, mask: np.ndarray) -> None:
    """A frame and its mask must have one size; a DataError naming the frame otherwise."""
    if image.shape[:2] != mask.shape[:2]:
        raise DataError(f"video '{frame.video}' frame '{frame.name}': image {image.shape[:2]} "
                        f"and mask {mask.shape[:2]} differ in size")


def read_mask(frame: Frame, lut: np.ndarray) -> np.ndarray:
    """Reduced mask ``[H, W]`` uint8 (``0..C-1``, 255 ignored)."""
    return reduce_mask(read_raw_mask(frame), lut, frame)
