"""Dataset fingerprints: what changes them (a frame's file size, a replaced video, the class
table) and what does not (the root's path, the split file's order), checked against a listing
hashed independently here."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from vspw_ray.data.fingerprint import clear_cache, data_fingerprint, split_digest
from vspw_ray.errors import DataError


def _reference_digest(root: Path, split: str) -> str:
    """The split's videos (by name) with their frames' and masks' names and sizes, listed with
    pathlib instead of os.scandir."""
    digest = hashlib.sha256()
    for video in sorted((root / f"{split}.txt").read_text().split()):
        vdir = root / "data" / video
        listing = [video]
        for sub, exts in (("origin", (".jpg", ".jpeg", ".png")), ("mask", (".png",))):
            folder = vdir / sub
            listing.append(sorted([p.name, p.stat().st_size] for p in folder.iterdir()
                                  if p.suffix.lower() in exts) if folder.is_dir() else None)
        digest.update(json.dumps(listing).encode() + b"\n")
    return digest.hexdigest()


def test_split_digest_matches_an_independent_listing(synth_root):
    for split in ("train", "val", "test"):
        assert split_digest(synth_root, split, cached=False) == _reference_digest(synth_root,
                                                                                   split)


def test_a_frame_of_another_size_changes_it_and_a_moved_root_does_not(synth_copy, tmp_path):
    before = data_fingerprint(synth_copy, ("train", "val"))
    train = data_fingerprint(synth_copy, ("train",))
    moved = tmp_path / "moved" / "elsewhere"
    shutil.move(str(synth_copy), moved)
    assert data_fingerprint(moved, ("train", "val")) == before  # the path does not count
    video = (moved / "val.txt").read_text().split()[0]
    frame = sorted((moved / "data" / video / "origin").iterdir())[3]
    with frame.open("ab") as f:  # a re-extracted frame: other bytes, another size
        f.write(b"\0")
    assert data_fingerprint(moved, ("train", "val")) == before  # cached in the process ...
    clear_cache()
    changed = data_fingerprint(moved, ("train", "val"))  # ... until the cache is cleared
    assert changed != before
    assert data_fingerprint(moved, ("train",)) == train  # the frame is a val frame


def test_videos_masks_and_the_class_table_count_and_the_split_order_does_not(synth_copy):
    root = synth_copy
    base = data_fingerprint(root, ("val",), cached=False)
    videos = (root / "val.txt").read_text().split()
    (root / "val.txt").write_text("\n".join(reversed(videos)) + "\n")
    assert data_fingerprint(root, ("val",), cached=False) == base  # order: the same videos
    mask = sorted((root / "data" / videos[0] / "mask").iterdir())[0]
    mask.write_bytes(mask.read_bytes() + b"\0")
    masked = data_fingerprint(root, ("val",), cached=False)
    assert masked != base
    shutil.copytree(root / "data" / videos[0], root / "data" / "replacement")
    (root / "val.txt").write_text("\n".join(["replacement", *videos[1:]]) + "\n")
    assert data_fingerprint(root, ("val",), cached=False) not in (base, masked)
    table = json.loads((root / "label_num_dic_final.json").read_text())
    renamed = {("renamed" if v == 1 else k): v for k, v in table.items()}
    replaced = data_fingerprint(root, ("val",), cached=False)
    (root / "label_num_dic_final.json").write_text(json.dumps(renamed))
    assert data_fingerprint(root, ("val",), cached=False) != replaced


def test_missing_data_is_named(synth_copy, tmp_path):
    with pytest.raises(DataError, match="config key 'data.root'.*does not exist"):
        data_fingerprint(tmp_path / "nowhere", ("val",))
    with pytest.raises(DataError, match="split file .*nope.txt does not exist"):
        data_fingerprint(synth_copy, ("nope",))
    video = (synth_copy / "val.txt").read_text().split()[0]
    shutil.rmtree(synth_copy / "data" / video)
    with pytest.raises(DataError, match=f"video '{video}' \\(listed in val.txt\\)"):
        data_fingerprint(synth_copy, ("val",), cached=False)
