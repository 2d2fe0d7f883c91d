"""Dataset fingerprints: a short stable hash of what defines the data a stage reads, so that
every id covers its data and results never carry over to other data.

A split's digest covers, for each video the split file lists (sorted by name), the names and
byte sizes of its frame images (``origin/``) and masks (``mask/``); the fingerprint covers the
class table and the digests of the splits used, in the order given. Nothing is decoded and the
root's path does not enter: a moved or copied dataset keeps its fingerprint, a re-extracted
frame of another size or a replaced video changes it. Files are listed with ``os.scandir`` and
sized with ``stat``: VSPW's 251k frames in 5-10 s on a shared 2-core machine, under 0.1 % of
a data check (``benchmarks/fingerprint.py``).

Digests are cached in the process, keyed by the root, the split and the split file's and class
table's modification times: a frame changed *during* one process (a long pipeline) is seen by
the next command, or after :func:`clear_cache`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from vspw_ray import ids
from vspw_ray.data.layout import CLASS_TABLE_FILE, IMAGE_EXTS, load_class_table, read_split
from vspw_ray.errors import DataError

__all__ = ["FINGERPRINT_LEN", "split_digest", "data_fingerprint", "split_fingerprint",
           "check_root", "clear_cache"]

FINGERPRINT_LEN = 12  # hex digits: 48 bits, no collision among a project's datasets
_CACHE: dict[tuple, str] = {}


def check_root(root: str | Path, key: str = "data.root") -> str:
    """``root`` as an absolute path; a DataError naming ``key`` when it is no dataset root."""
    path = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(path):
        raise DataError(f"config key '{key}': dataset root {root} does not exist; every id "
                        f"covers the data's fingerprint, so the data must be there (point "
                        f"{key} at a VSPW-layout folder, e.g. one made by `vspw-ray data synth`)")
    if not os.path.isfile(os.path.join(path, CLASS_TABLE_FILE)):
        raise DataError(f"config key '{key}': {root} holds no {CLASS_TABLE_FILE}; it is not a "
                        f"VSPW-layout dataset root (vspw-ray data check {root} says more)")
    return path


def _listing(folder: str, exts: tuple[str, ...]) -> list[tuple[str, int]] | None:
    """``(name, bytes)`` of the files in ``folder`` with one of ``exts``, by name; None when
    the folder does not exist."""
    try:
        with os.scandir(folder) as entries:
            return sorted((e.name, e.stat().st_size) for e in entries
                          if e.name.lower().endswith(exts) and e.is_file())
    except FileNotFoundError:
        return None


def _video_entry(root: str, video: str, split: str) -> list:
    vdir = os.path.join(root, "data", video)
    frames = _listing(os.path.join(vdir, "origin"), IMAGE_EXTS)
    if frames is None:
        raise DataError(f"video '{video}' (listed in {split}.txt): {vdir}/origin does not "
                        f"exist; vspw-ray data check {root} lists every problem")
    return [video, frames, _listing(os.path.join(vdir, "mask"), (".png",))]


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def split_digest(root: str | Path, split: str, *, cached: bool = True) -> str:
    """The digest of one split: its videos' frame and mask names with their byte sizes."""
    path = check_root(root)
    split_file = os.path.join(path, f"{split}.txt")
    videos = read_split(path, split)  # a DataError naming the split file when it is missing
    key = (path, split, _stamp(split_file), _stamp(os.path.join(path, CLASS_TABLE_FILE)))
    if cached and key in _CACHE:
        return _CACHE[key]
    digest = hashlib.sha256()
    for video in sorted(videos):
        digest.update(json.dumps(_video_entry(path, video, split)).encode())
        digest.update(b"\n")
    _CACHE[key] = digest.hexdigest()
    return _CACHE[key]


def data_fingerprint(root: str | Path, splits: Sequence[str], *, cached: bool = True) -> str:
    """The fingerprint of the class table and ``splits`` (in this order) of the dataset at
    ``root``: ``FINGERPRINT_LEN`` hex digits.

    Raises:
        DataError: the root, its class table, a split file or a listed video is missing.
    """
    path = check_root(root)
    table = load_class_table(path)
    return ids.digest({"classes": [list(table.names), table.ignored_name],
                           "splits": [split_digest(path, s, cached=cached) for s in splits]},
                      FINGERPRINT_LEN)


def clear_cache() -> None:
    """Forget the digests of this process (they are computed again on the next call)."""
    _CACHE.clear()


def split_fingerprint(root: str | Path, split: str) -> str:
    """The fingerprint of one split's data (the class table and the split's videos, frames and
    file sizes), as score-store members and submissions are keyed by it."""
    return data_fingerprint(root, (split,))
