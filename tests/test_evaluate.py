import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.test_metrics import official_miou, official_vc
from vspw_ray.data import (
    DataError,
    label_lut,
    load_class_table,
    read_raw_mask,
    read_split,
    split_frames,
)
from vspw_ray.data.layout import reduce_mask
from vspw_ray.evaluate import evaluate_predictions


def _write_predictions(root, split, out, noise=0.0, seed=0):
    table = load_class_table(root)
    lut = label_lut(table.num_classes)
    rng = np.random.default_rng(seed)
    for f in split_frames(root, split):
        gt = reduce_mask(read_raw_mask(f), lut, f)
        pred = np.where(gt == 255, 0, gt)
        flip = rng.random(pred.shape) < noise
        pred = np.where(flip, rng.integers(0, table.num_classes, pred.shape), pred).astype(np.uint8)
        (out / f.video).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pred).save(out / f.video / f"{f.name}.png")


def test_ground_truth_against_itself_is_perfect(synth_root, tmp_path):
    _write_predictions(synth_root, "val", tmp_path)
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "vspw_ray", "evaluate", "--pred", str(tmp_path),
                             "--root", str(synth_root), "--split", "val", "--json", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["miou"] == report["fwiou"] == report["pixel_acc"] == 1.0
    assert {"miou", "fwiou", "pixel_acc", "vc8", "vc16", "per_class_iou"} <= report.keys()
    assert "mIoU" in result.stdout


def test_noisy_predictions_agree_with_official_formulas(camvid_root, tmp_path):
    _write_predictions(camvid_root, "val", tmp_path, noise=0.3, seed=1)
    report = evaluate_predictions(tmp_path, camvid_root, "val", processes=2)
    lut = label_lut(11)
    gts, preds, raws = [], [], {}
    for f in split_frames(camvid_root, "val"):
        raw = read_raw_mask(f)
        raws.setdefault(f.video, []).append((raw, np.asarray(Image.open(tmp_path / f.video / f"{f.name}.png"))))
        gts.append(reduce_mask(raw, lut).astype(int))
        preds.append(raws[f.video][-1][1].astype(int))
    gt_red = np.concatenate([g.ravel() for g in gts])
    gt_red[gt_red == 255] = -1
    miou, fw, pa = official_miou(gt_red, np.concatenate([p.ravel() for p in preds]), 11)
    assert report["miou"] == pytest.approx(miou)
    assert report["fwiou"] == pytest.approx(fw)
    assert report["pixel_acc"] == pytest.approx(pa)
    for n, key in ((8, "vc8"), (16, "vc16")):
        accs = [a for v in raws.values() for a in official_vc([r for r, _ in v], [p for _, p in v], n)]
        expected = float(np.nanmean(accs)) if accs and not np.all(np.isnan(accs)) else None
        assert report[key] == (pytest.approx(expected) if expected is not None else None)


def test_missing_prediction_frame_is_named(synth_root, tmp_path):
    _write_predictions(synth_root, "val", tmp_path)
    video = read_split(synth_root, "val")[0]
    (tmp_path / video / "00000004.png").unlink()
    with pytest.raises(DataError, match=f"{video}/00000004.png"):
        evaluate_predictions(tmp_path, synth_root, "val")


def test_folds_partition_the_frames(synth_root, tmp_path):
    _write_predictions(synth_root, "train", tmp_path, noise=0.2)
    a = evaluate_predictions(tmp_path, synth_root, "train", fold="A", processes=1)
    b = evaluate_predictions(tmp_path, synth_root, "train", fold="B", processes=1)
    whole = evaluate_predictions(tmp_path, synth_root, "train", processes=2)
    assert a["frames"] + b["frames"] == whole["frames"]
    assert np.array_equal(np.add(a["confusion"], b["confusion"]), whole["confusion"])
