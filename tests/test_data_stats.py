import json

import numpy as np
import pytest
from PIL import Image

from vspw_ray.data.stats import class_prior, class_stats, load_prior, write_stats
from vspw_ray.data.synth import palette


def _make(root, masks_by_video, classes=3):
    (root / "label_num_dic_final.json").write_text(json.dumps(
        {"others": 0, **{f"c{i}": i for i in range(1, classes + 1)}}))
    (root / "train.txt").write_text("".join(f"{v}\n" for v in masks_by_video))
    for video, masks in masks_by_video.items():
        for d in ("origin", "mask"):
            (root / "data" / video / d).mkdir(parents=True)
        for i, m in enumerate(masks):
            Image.fromarray(np.zeros(m.shape + (3,), np.uint8)).save(root / "data" / video / "origin" / f"{i:05d}.jpg")
            im = Image.frombytes("P", m.shape[::-1], m.astype(np.uint8).tobytes())
            im.putpalette(palette())
            im.save(root / "data" / video / "mask" / f"{i:05d}.png")


def test_counts_videos_and_prior_on_purpose_made_data(tmp_path):
    a = np.array([[1, 1, 0], [255, 2, 2]])  # raw: class c1 x2, c2 x2, others/void ignored
    b = np.array([[1, 1, 1], [1, 1, 1]])
    _make(tmp_path, {"v1": [a, a], "v2": [b]})
    stats = class_stats(tmp_path, "train", processes=2)
    assert [c["pixels"] for c in stats["classes"]] == [4 + 6, 4, 0]
    assert [c["videos"] for c in stats["classes"]] == [2, 1, 0]
    assert stats["num_frames"] == 3 and stats["ignored_pixels"] == 4
    prior = class_prior(np.array([10, 4, 0]))
    np.testing.assert_allclose(prior, np.array([11, 5, 1]) / 17)
    paths = write_stats(stats, tmp_path / "out")
    assert paths["chart"].stat().st_size > 1000
    np.testing.assert_allclose(load_prior(paths["prior"], ["c1", "c2", "c3"]), prior)
    with pytest.raises(ValueError, match="other classes"):
        load_prior(paths["prior"], ["c1", "c2"])
