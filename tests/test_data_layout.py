import numpy as np
import pytest
import torch

from vspw_ray.config import DataConfig
from vspw_ray.data import (
    DataError,
    fold_videos,
    label_lut,
    list_frames,
    load_class_table,
    read_split,
    reduce_mask,
    split_folds,
    split_frames,
)
from vspw_ray.data.datasets import EvalDataset, IterationSampler, TrainDataset
from vspw_ray.data.synth import palette


def test_label_mapping_matches_official_rule():
    lut = label_lut(124)
    raw = np.array([[0, 1, 124, 255]], np.uint8)
    assert reduce_mask(raw, lut).tolist() == [[255, 0, 123, 255]]
    with pytest.raises(DataError, match=r"\[125\]"):
        reduce_mask(np.array([[125]], np.uint8), lut)


def test_camvid_class_table_and_frames(camvid_root):
    table = load_class_table(camvid_root)
    assert table.num_classes == 11 and table.names[0] == "sky" and table.names[-1] == "bicyclist"
    videos = read_split(camvid_root, "val")
    frames = list_frames(camvid_root, videos[0])
    assert [f.name for f in frames] == sorted(f.name for f in frames)
    assert all(f.mask is not None and f.mask.is_file() for f in frames)


def test_folds_disjoint_cover_and_stable():
    videos = [f"video_{i:03d}" for i in range(101)]
    a, b = split_folds(videos, seed=0)
    assert set(a).isdisjoint(b) and set(a) | set(b) == set(videos)
    assert len(a) == 51 and len(b) == 50
    assert split_folds(list(reversed(videos)), seed=0)[0] == list(reversed(a))  # order-independent
    assert split_folds(videos, seed=1)[0] != a  # the seed changes the split
    assert fold_videos(videos, "B") == b and fold_videos(videos, None) == videos
    with pytest.raises(ValueError, match="fold must be"):
        fold_videos(videos, "C")


def test_sampler_resume_and_world_size_independence():
    full = list(IterationSampler(10, 4, seed=5, num_iters=6))
    resumed = list(IterationSampler(10, 4, seed=5, start_iter=3, num_iters=6))
    assert resumed == full[12:]
    two = [list(IterationSampler(10, 4, rank=r, world_size=2, seed=5, num_iters=6)) for r in (0, 1)]
    merged = [x for it in range(6) for r in (0, 1) for x in two[r][2 * it: 2 * it + 2]]
    assert merged == full  # the global batch does not depend on the number of workers
    epoch0 = [i for i, _ in full[:10]]
    assert sorted(epoch0) == list(range(10))  # each epoch is a permutation of all frames


def test_train_crops_shapes_padding_and_determinism(camvid_root):
    table = load_class_table(camvid_root)
    frames = split_frames(camvid_root, "train")
    cfg = DataConfig(root=str(camvid_root), crop_size=(480, 640), ratio_range=(0.5, 0.5))
    ds = TrainDataset(frames, table.num_classes, cfg)
    a = ds[(0, 123)]
    assert a["image"].shape == (3, 480, 640) and a["mask"].shape == (480, 640)
    # CamVid frames are 360x480: at ratio 0.5 they are 180x240, the rest is padding
    assert (a["mask"][180:, :] == 255).all() and (a["mask"][:, 240:] == 255).all()
    assert (a["image"][:, 180:, :] == 0).all()
    assert set(a["mask"][:180, :240].unique().tolist()) <= set(range(11)) | {255}
    b = ds[(0, 123)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    c = ds[(0, 124)]
    assert not torch.equal(a["image"], c["image"])


def test_crop_smaller_than_frame_is_full_crop(synth_root):
    table = load_class_table(synth_root)
    frames = split_frames(synth_root, "train")
    cfg = DataConfig(crop_size=(32, 48), ratio_range=(1.0, 2.0))
    ds = TrainDataset(frames, table.num_classes, cfg)
    for seed in range(5):
        s = ds[(seed, seed)]
        assert s["image"].shape == (3, 32, 48)
        assert (s["mask"] != 255).any()


def test_eval_dataset_whole_frames_and_test_without_masks(synth_copy):
    import shutil

    table = load_class_table(synth_copy)
    test_video = read_split(synth_copy, "test")[0]
    shutil.rmtree(synth_copy / "data" / test_video / "mask")
    frames = split_frames(synth_copy, "test", require_masks=False)
    ds = EvalDataset(frames, table.num_classes, DataConfig())
    item = ds[0]
    assert item["image"].shape == (3, 64, 80) and "mask" not in item
    with pytest.raises(DataError, match=f"video '{test_video}'.*mask .* is missing"):
        split_frames(synth_copy, "test", require_masks=True)


def test_bad_label_is_an_error_or_skipped_when_configured(synth_copy, caplog):
    from PIL import Image

    table = load_class_table(synth_copy)
    frames = split_frames(synth_copy, "train")
    arr = np.asarray(Image.open(frames[0].mask)).copy()
    arr[0, 0] = 200
    im = Image.frombytes("P", arr.shape[::-1], arr.tobytes())
    im.putpalette(palette())  # without a palette PIL would remap the indices on save
    im.save(frames[0].mask)
    ds = TrainDataset(frames, table.num_classes, DataConfig(crop_size=(32, 32)))
    with pytest.raises(DataError, match=f"video '{frames[0].video}' frame '{frames[0].name}'.*200"):
        ds[(0, 1)]
    skipping = TrainDataset(frames, table.num_classes,
                            DataConfig(crop_size=(32, 32), skip_bad_frames=True))
    assert skipping[(0, 1)]["mask"].shape == (32, 32)
    assert "skipping bad frame" in caplog.text and frames[0].name in caplog.text
