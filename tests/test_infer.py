"""TTA, the score encoding, the Parquet store, and `vspw-ray infer` as a Ray Data job."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_train_ray import EXPERIMENT
from vspw_ray.infer.tta import tta_probs
from vspw_ray.scores.encoding import ScoreEncoding, decode, encode
from vspw_ray.scores.store import ScoreStore, StoreError


class Conv(nn.Module):
    """``predict`` = softmax of one convolution: 1x1 is flip-equivariant, 3x3 random is not."""

    def __init__(self, kernel, classes=5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, classes, kernel, padding=kernel // 2)

    def predict(self, x):
        return self.conv(x).softmax(1)


def test_tta_of_a_flip_equivariant_model_changes_nothing_and_scales_average():
    x = torch.randn(1, 3, 24, 40)
    pointwise = Conv(1)
    plain = pointwise.predict(x)[0]
    torch.testing.assert_close(tta_probs(pointwise, x, (1.0,), flip=True), plain)

    model = Conv(3)
    scales = (0.5, 1.0, 1.5)
    views = []
    for s in scales:  # the direct computation, view by view
        size = (round(24 * s), round(40 * s))
        xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True):
            p = model.predict(xs.flip(-1) if flipped else xs)
            p = p.flip(-1) if flipped else p
            views.append(F.interpolate(p, size=(24, 40), mode="bilinear", align_corners=False)[0])
    expected = torch.stack(views).mean(0)
    got = tta_probs(model, x, scales, flip=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(0), torch.ones(24, 40), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, model.predict(x)[0], atol=1e-3)  # the views do matter


def _probs(c=20, h=30, w=40, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, h, w, generator=g) * sharp).softmax(0)


def test_encoding_keeps_rare_class_scores_in_the_log_domain():
    probs = _probs()
    enc = ScoreEncoding(scale=1.0, top_k=20, step=1 / 32)
    back = decode(encode(probs, enc), 20, enc)
    # every class, rare ones included, within half a code: the ratio of any two classes of a
    # pixel is kept to exp(1/32) - 1 = 3.2 % (decoding renormalises each pixel)
    mask = probs > torch.exp(torch.tensor(-250 / 32))
    ratio = torch.where(mask, back / probs, torch.nan)
    spread = ratio.nan_to_num(0).amax(0) / ratio.nan_to_num(torch.inf).amin(0)
    assert spread.max() <= np.exp(1 / 32) + 1e-5
    torch.testing.assert_close(back.sum(0), torch.ones_like(back[0]))
    rare = probs < 1e-3
    assert rare.sum() > 100 and (back[rare] > 0).all()
    assert ((probs[rare] * 255).round() == 0).all()  # what 8-bit linear storage would keep


def test_encoding_top_k_spreads_the_rest_and_pools_by_area():
    probs = _probs()
    enc = ScoreEncoding(scale=0.5, top_k=4, step=1 / 32)
    e = encode(probs, enc)
    assert e.classes.shape == (4, 15, 20) and (e.height, e.width) == (30, 40)
    pooled = F.avg_pool2d(probs[None], 2)[0]  # area interpolation by 1/2 = 2x2 mean
    top = pooled.topk(4, dim=0)
    assert (torch.from_numpy(e.classes.astype(np.int64)) == top.indices).float().mean() > 0.999
    small = decode(e, 20, enc, full_size=False)
    torch.testing.assert_close(small.sum(0), torch.ones(15, 20))
    kept = small.gather(0, top.indices)  # half a code each, then the pixel renormalised
    torch.testing.assert_close(kept, top.values, rtol=np.exp(1 / 32) - 1 + 1e-4, atol=1e-7)
    others = small.clone().scatter_(0, top.indices, 0.0)
    expected_fill = (1 - kept.sum(0)).clamp_min(0) / 16
    torch.testing.assert_close(others.max(0).values, expected_fill, rtol=1e-5, atol=1e-7)
    assert decode(e, 20, enc).shape == (20, 30, 40)


def _encoded_rows(video, frames, seed):
    enc = ScoreEncoding(scale=0.5, top_k=3)
    rows = []
    for i, frame in enumerate(frames):
        e = encode(_probs(6, 8, 10, seed=seed + i), enc)
        rows.append({"video": video, "frame": frame, "height": 8, "width": 10,
                     "score_height": 4, "score_width": 5, "classes": e.classes.tobytes(),
                     "codes": e.codes.tobytes()})
    return rows


def test_store_round_trip_aligned_read_and_half_written_files(tmp_path):
    store = ScoreStore(tmp_path / "store")
    frames = {"v1": ["0001", "0002", "0003"], "v2": ["0001", "0002"]}
    for member, seed in (("m-a", 0), ("m-b", 100)):
        store.write_manifest(member, {"encoding": {"params": {"scale": 0.5, "top_k": 3,
                                                              "step": 1 / 32}}})
        for video, names in frames.items():
            store.write_video(member, "val", video, list(reversed(_encoded_rows(video, names, seed))))
    assert store.members() == ["m-a", "m-b"]
    table = pq.read_table(store.video_path("m-a", "val", "v1"))  # plain pyarrow reads it
    assert table.column("frame").to_pylist() == ["0001", "0002", "0003"]  # frame order
    assert table.schema.field("classes").type == "binary"

    batches = list(store.read_aligned(["m-a", "m-b"], "val", batch_frames=2))
    keys = [k for b in batches for k in b.keys]
    assert keys == [("v1", "0001"), ("v1", "0002"), ("v1", "0003"), ("v2", "0001"), ("v2", "0002")]
    assert [len(b.keys) for b in batches] == [2, 2, 1]
    first = batches[0].scores
    want = _encoded_rows("v1", ["0001"], 100)[0]
    assert first["m-b"][0].classes.tobytes() == want["classes"]
    assert first["m-a"][0].classes.tobytes() != first["m-b"][0].classes.tobytes()

    # a member missing a video cannot be aligned
    os.remove(store.video_path("m-b", "val", "v2"))
    with pytest.raises(StoreError, match="hold different val videos"):
        list(store.read_aligned(["m-a", "m-b"], "val"))
    # a truncated file and a leftover temporary file are redone, complete ones kept
    path = Path(store.video_path("m-a", "val", "v1"))
    path.write_bytes(path.read_bytes()[:100])
    (path.parent / ".tmp-v2.parquet").write_bytes(b"partial")
    assert store.done_videos("m-a", "val", {"v1": 3, "v2": 2}) == {"v2"}
    assert not path.exists() and not (path.parent / ".tmp-v2.parquet").exists()
    with pytest.raises(StoreError, match="no member 'm-c'"):
        store.manifest("m-c")


# ------------------------------------------------------------------------------ Ray Data job


def _checkpoint(cfg, folder, **extra):
    from vspw_ray.config import variant_id
    from vspw_ray.data import load_class_table
    from vspw_ray.models import build_model
    from vspw_ray.train.loop import build_optimizer, build_scheduler
    from vspw_ray.train.ray_train import save_training_state

    torch.manual_seed(0)
    model = build_model(cfg, load_class_table(cfg.data.root).num_classes)
    opt = build_optimizer(model, cfg.train)
    folder.mkdir(parents=True, exist_ok=True)
    save_training_state(folder, model=model, optimizer=opt, scheduler=build_scheduler(opt, cfg.train),
                        scaler=None, iteration=0, cfg=cfg, variant=variant_id(cfg), **extra)
    return folder


def _cfg(root, storage, *extra):
    from vspw_ray.config import load_config, resolve_variant

    return resolve_variant(load_config(EXPERIMENT, [
        f"data.root={root}", f"storage.path={storage}", "infer.scales=[0.75,1.0]",
        "infer.actors=1", *extra]), "crop64")


@pytest.mark.slow(10)
def test_infer_job_writes_every_frame_and_scores_match_the_pngs(ray_local, synth_root, tmp_path,
                                                                monkeypatch):
    import mlflow

    from vspw_ray.data import split_frames
    from vspw_ray.evaluate import evaluate_predictions, evaluate_store, evaluate_store_folds
    from vspw_ray.infer.job import run_inference
    from vspw_ray.tracking import SAMPLING_ENV

    # full resolution, every class: the stored argmax must agree with the PNGs
    cfg = _cfg(synth_root, tmp_path / "runs", "infer.score_scale=1.0", "infer.top_k=6",
               "tracking.system_metrics=true")
    ckpt = _checkpoint(cfg, tmp_path / "ckpt")
    monkeypatch.setenv(SAMPLING_ENV, "0.2")  # the driver passes it to the model actors
    out = run_inference(cfg, str(ckpt), "val")
    frames = split_frames(synth_root, "val")
    assert out.frames == len(frames) and not out.skipped
    for f in frames:
        assert (Path(out.predictions) / f.video / f"{f.name}.png").is_file()
    store = ScoreStore(out.store)
    manifest = store.manifest(out.key)
    assert manifest["variant_id"] == out.variant_id and out.key.startswith(out.variant_id)
    assert manifest["tta"] == {"scales": [0.75, 1.0], "flip": True}
    assert manifest["encoding"]["params"] == {"scale": 1.0, "top_k": 6, "step": 0.03125}
    png = evaluate_predictions(out.predictions, synth_root, "val", processes=1)
    stored = evaluate_store(out.store, out.key, synth_root, "val", processes=1)
    assert stored["miou"] == pytest.approx(png["miou"], abs=0.005)
    assert out.metrics["miou"] == pytest.approx(stored["miou"])
    # one pass over the store for the folds and the whole split = a pass for each
    together = evaluate_store_folds(out.store, out.key, synth_root, "val", processes=1)
    for fold in ("A", "B", None):
        alone = evaluate_store(out.store, out.key, synth_root, "val", fold=fold,
                               processes=1)
        assert together[fold]["confusion"] == alone["confusion"]
        assert together[fold]["frames"] == alone["frames"] and together[fold]["fold"] == alone["fold"]
        assert together[fold]["vc8"] == pytest.approx(alone["vc8"], nan_ok=True)
    assert together[None]["confusion"] == stored["confusion"]

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(out.run_id)
    assert run.data.tags["stage"] == "infer" and run.data.params["tta.flip"] == "True"
    assert run.data.metrics["store_bytes"] == out.store_bytes > 0
    assert run.data.metrics["frames_per_s"] > 0 and "val/miou" in run.data.metrics
    # the driver's node, and the model actors' node by its Ray node id (one actor samples it)
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert [k for k in run.data.metrics if k.startswith("system/node-")
            and k.endswith("/cpu_utilization_percentage")]

    again = run_inference(cfg, str(ckpt), "val", track=False)  # everything stored: nothing runs
    assert again.frames == 0 and again.key == out.key


@pytest.mark.slow(16)
def test_other_tta_settings_checkpoint_or_data_never_reuse_old_scores(ray_local, synth_copy,
                                                                      tmp_path):
    """The store is keyed by the checkpoint, the infer settings and the split's data: a re-run
    with other scales writes a new member; the old one stays readable. With no --checkpoint,
    the variant's checkpoint is found in the run layout."""
    from vspw_ray.config import variant_fingerprint, variant_id
    from vspw_ray.evaluate import evaluate_store
    from vspw_ray.infer.job import run_inference
    from vspw_ray.layout import RunLayout

    synth_root, storage = synth_copy, tmp_path / "runs"
    cfg = _cfg(synth_root, storage, "infer.flip=false")
    layout = RunLayout(str(storage))
    ckpt = _checkpoint(cfg, Path(layout.train_run(variant_id(cfg))) / "checkpoint_000000",
                       data_fingerprint=variant_fingerprint(cfg))
    first = run_inference(cfg, None, "val", track=False)  # found from the config alone
    assert first.frames > 0
    other = _cfg(synth_root, storage, "infer.flip=false", "infer.scales=[1.0]")
    second = run_inference(other, None, "val", track=False)
    assert second.key != first.key and second.frames == first.frames
    assert second.variant_id == first.variant_id
    store = ScoreStore(first.store)
    assert set(store.members()) == {first.key, second.key}
    assert store.manifest(first.key)["tta"]["scales"] == [0.75, 1.0]
    assert store.manifest(second.key)["tta"]["scales"] == [1.0]
    for out in (first, second):  # both readable and scored
        report = evaluate_store(out.store, out.key, synth_root, "val", processes=1)
        assert report["miou"] == pytest.approx(out.metrics["miou"])
        assert Path(out.predictions).parent.name == out.key
    _replaced_val_video_is_a_new_member(store, second, other, ckpt)


def _replaced_val_video_is_a_new_member(store: ScoreStore, old, cfg, ckpt: Path) -> None:
    """A member covers one split's data: with a val video replaced, the same checkpoint and
    settings write a new member with every video inferred (none reused); the old member's
    files and manifest are untouched. The weights learnt on the data before: the new manifest
    records a transfer (``infer --checkpoint`` of weights from other data)."""
    import shutil

    from vspw_ray.data.fingerprint import split_fingerprint
    from vspw_ray.infer.job import run_inference

    root = Path(cfg.data.root)
    files = {p: p.stat().st_mtime_ns for p in Path(old.store, old.key).rglob("*")}
    manifest = store.manifest(old.key)
    assert manifest["data_fingerprint"] == split_fingerprint(str(root), "val")
    assert manifest["transfer"] == "same data"
    before = (root / "val.txt").read_text().split()
    shutil.copytree(root / "data" / before[0], root / "data" / "replacement")
    after = ["replacement", *before[1:]]
    (root / "val.txt").write_text("\n".join(after) + "\n")

    new = run_inference(cfg, str(ckpt), "val", track=False)
    assert new.key != old.key and new.variant_id == old.variant_id
    assert new.frames == old.frames  # every video inferred again, the shared ones too
    assert store.videos(new.key, "val") == sorted(after)
    assert store.videos(old.key, "val") == sorted(before)
    assert {p: p.stat().st_mtime_ns for p in Path(old.store, old.key).rglob("*")} == files
    assert store.manifest(old.key) == manifest
    written = store.manifest(new.key)
    assert written["data_fingerprint"] == split_fingerprint(str(root), "val") != \
        manifest["data_fingerprint"]
    assert written["checkpoint_data_fingerprint"] == manifest["checkpoint_data_fingerprint"]
    assert written["transfer"] == "other data"


@pytest.mark.slow(11)
def test_corrupt_frame_fails_naming_it_or_is_skipped(ray_local, synth_copy, tmp_path):
    from vspw_ray.data import split_frames
    from vspw_ray.infer.job import run_inference

    bad = split_frames(synth_copy, "val")[3]
    bad.image.write_bytes(bad.image.read_bytes()[:200])  # a truncated JPEG
    cfg = _cfg(synth_copy, tmp_path / "runs")
    ckpt = _checkpoint(cfg, tmp_path / "ckpt")
    with pytest.raises(Exception, match=str(bad.image)):
        run_inference(cfg, str(ckpt), "val", track=False)
    cfg = _cfg(synth_copy, tmp_path / "runs", "infer.on_bad_frame=skip")
    out = run_inference(cfg, str(ckpt), "val", track=False)
    assert out.skipped == [f"{bad.video}/{bad.name}"]
    rows = pq.read_table(ScoreStore(out.store).video_path(out.key, "val", bad.video))
    assert bad.name not in rows.column("frame").to_pylist()
    assert ScoreStore(out.store).manifest(out.key)["splits"]["val"]["skipped"] == {
        bad.video: [bad.name]}


@pytest.mark.slow(50)
def test_infer_killed_mid_way_and_rerun_stores_every_frame_once(synth_root, tmp_path):
    from vspw_ray.data import split_frames

    storage = tmp_path / "runs"
    cfg = _cfg(synth_root, storage)
    ckpt = _checkpoint(cfg, tmp_path / "ckpt")
    cmd = [sys.executable, "-m", "vspw_ray", "infer", str(EXPERIMENT), "--checkpoint", str(ckpt),
           "--split", "train", "--no-track", f"data.root={synth_root}", f"storage.path={storage}",
           "infer.scales=[0.75,1.0,1.25,1.5]", "infer.actors=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not list(storage.glob("scores/*/train/*.parquet")):
        assert proc.poll() is None and time.time() < deadline, "no video stored before the kill"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    frames = split_frames(synth_root, "train")
    videos = sorted({f.video for f in frames})
    assert len(list(storage.glob("scores/*/train/*.parquet"))) < len(videos)  # killed mid-way

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already stored" in rerun.stdout
    stored = {}
    for path in storage.glob("scores/*/train/*"):
        assert path.suffix == ".parquet" and not path.name.startswith(".tmp")
        stored[path.stem] = pq.read_table(path).column("frame").to_pylist()
    assert sorted(stored) == videos
    for video in videos:  # every frame exactly once
        assert stored[video] == sorted(f.name for f in frames if f.video == video)
    manifest = json.loads(next(storage.glob("scores/*/manifest.json")).read_text())
    assert manifest["splits"]["train"]["frames"] == len(frames)


def test_ray_data_logging_config_names_classes_that_exist():
    """vspw_ray/ray_data_logging.yaml (Ray Data's console at WARNING) names Ray's own handler,
    formatter and filter classes (ray 2.60, pinned <2.61): each must still import, or Ray Data
    fails to configure its logging at import."""
    import importlib

    import yaml

    from vspw_ray.runtime import RAY_DATA_LOGGING

    config = yaml.safe_load(RAY_DATA_LOGGING.read_text())
    names = [h["class"] for h in config["handlers"].values()] + [
        f["()"] for f in config["filters"].values()]
    for name in names:
        module, attr = name.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), attr), name
    assert config["handlers"]["console"]["level"] == "WARNING"
    assert config["loggers"]["ray.data"]["handlers"] == ["file", "console"]
