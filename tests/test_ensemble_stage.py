"""`vspw-ray ensemble` end to end on synthetic score stores whose best weights are known:
members found from their checkpoints, tune / grid / greedy each recovering the designed weights,
the report's fold figures reproduced by `vspw-ray evaluate` on the submission's PNGs, re-runs
that reuse the weights and finish a half-written submission, MLflow, and every bad input named.
"""

from __future__ import annotations

import functools
import json
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_train_ray import EXPERIMENT
from vspw_ray.config import config_from_dict, load_config, resolve_variant, to_dict, variant_id
from vspw_ray.ensemble.stage import run_ensemble
from vspw_ray.errors import UserError

C = 6  # the synthetic dataset's classes
A_STAR, B_STAR = 0.6, 1.4  # the designed optimum of (weak, aux): inside 0..2, off the corners
SLOPE = 0.4
ENC = {"scale": 1.0, "top_k": C, "step": 1 / 32}  # full resolution, every class kept
VARIANTS = [{"name": "strong", "seed": 0, "overrides": {}},
            {"name": "weak", "seed": 1, "overrides": {}},
            {"name": "aux", "seed": 0, "overrides": {"model.family": "maskformer"}}]
GROUPS = {"strong": ["strong"], "weak": ["weak"], "aux": ["aux"]}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    """The suite's synthetic set with 18 frames a video: long enough for VC16 (a window of 16
    frames needs 17), so every figure the submission is compared on can differ."""
    from vspw_ray.data.synth import SynthSpec, synthesize

    root = tmp_path_factory.mktemp("synth18")
    synthesize(root, SynthSpec(videos=8, frames=18, classes=6, height=64, width=80, seed=3),
               processes=1)
    return root


def pixel_types() -> np.ndarray:
    """Margins ``[T, 3]`` (true class minus rival) in the base, weak and aux scores. An easy
    type wins at any weights; each hard type flips at one threshold of one weight, 0.05 off the
    grid points: right iff alpha > t (t = 0.55, 0.45, ...) or alpha < t (0.65, 0.75, ...),
    likewise for beta around 1.4. So the fused mIoU is 100 % only around (0.6, 1.4)."""
    types = [(0.3, 0.3, 0.3)]
    for axis, best in ((1, A_STAR), (2, B_STAR)):
        for t in np.round(np.arange(best - 0.05, 0, -0.1), 2):
            m = [-SLOPE * t, 0.0, 0.0]
            m[axis] = SLOPE
            types.append(m)
        for t in np.round(np.arange(best + 0.05, 2, 0.1), 2):
            m = [SLOPE * t, 0.0, 0.0]
            m[axis] = -SLOPE
            types.append(m)
    return np.array(types)


def designed_probs(gt: np.ndarray, video: str, frame: str, hard: float = 0.2) -> np.ndarray:
    """The three members' probabilities ``[3, C, H, W]`` of one frame with reduced ground truth
    ``gt [H, W]``: each pixel's true class and a rival take 0.9 between them by its type's
    margin, the other classes 0.025 each. Draws depend on (video, frame) only."""
    rng = np.random.default_rng(zlib.crc32(f"{video}/{frame}".encode()))
    types, n = pixel_types(), gt.size
    p = np.r_[1 - hard, np.full(len(types) - 1, hard / (len(types) - 1))]
    kind = rng.choice(len(types), size=n, p=p)
    flat = gt.ravel().astype(np.int64)
    true = np.where(flat == 255, rng.integers(0, C, n), flat)
    rival = (true + rng.integers(1, C, n)) % C
    probs = np.full((3, C, n), 0.1 / (C - 2))
    cols = np.arange(n)
    for k in range(3):
        probs[k, true, cols] = 0.45 + types[kind, k] / 2
        probs[k, rival, cols] = 0.45 - types[kind, k] / 2
    return probs.reshape(3, C, *gt.shape)


def dominance_probs(gt: np.ndarray, video: str, frame: str) -> np.ndarray:
    """Three members ``[3, C, H, W]`` where one dominates: ``oracle`` is right on 95 % of the
    pixels and wrong on the rest, each by a thin margin (0.40 against 0.35); ``noisy1`` and
    ``noisy2`` are each confidently wrong (rival 0.8, true 0.1) on their own random 30 %.
    Averaging the oracle with either flips its pixels: the best mix of the seed's groups
    (strong = oracle + noisy1, aux = noisy2 at about 0.5) is right on about 89 %."""
    rng = np.random.default_rng(zlib.crc32(f"dominance/{video}/{frame}".encode()))
    n = gt.size
    flat = gt.ravel().astype(np.int64)
    true = np.where(flat == 255, rng.integers(0, C, n), flat)
    rival = (true + rng.integers(1, C, n)) % C
    cols = np.arange(n)
    probs = np.full((3, C, n), 0.25 / (C - 2))
    slip = rng.random(n) < 0.05
    probs[0, true, cols] = np.where(slip, 0.35, 0.40)
    probs[0, rival, cols] = np.where(slip, 0.40, 0.35)
    for k in (1, 2):
        wrong = rng.random(n) < 0.3
        probs[k] = 0.1 / (C - 2)
        probs[k, true, cols] = np.where(wrong, 0.1, 0.8)
        probs[k, rival, cols] = np.where(wrong, 0.8, 0.1)
    return probs.reshape(3, C, *gt.shape)


@functools.cache
def encoded_rows(root, split: str, k: int, dominance: bool = False) -> dict[str, list[dict]]:
    """Member ``k``'s designed scores of a split (``dominance``: of :func:`dominance_probs`)
    through the real encoding: store rows by video (one torch thread: tiny tensors on a busy
    machine)."""
    from vspw_ray.data import label_lut, list_frames, read_raw_mask, read_split, reduce_mask
    from vspw_ray.scores import ScoreEncoding, encode

    enc, lut, threads = ScoreEncoding(**ENC), label_lut(C), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for video in read_split(root, split):
            out[video] = []
            for frame in list_frames(root, video):
                gt = reduce_mask(read_raw_mask(frame), lut)
                probs = (dominance_probs if dominance else designed_probs)(gt, video, frame.name)
                p = torch.from_numpy(probs[k]).float()
                e = encode(p, enc)
                out[video].append({
                    "video": video, "frame": frame.name, "height": e.height, "width": e.width,
                    "score_height": e.classes.shape[1], "score_width": e.classes.shape[2],
                    "classes": e.classes.tobytes(), "codes": e.codes.tobytes()})
        return out
    finally:
        torch.set_num_threads(threads)


def write_member(store, root, key: str, k: int, manifest: dict, splits=("val",),
                 drop_video=None, drop_frame=None, dominance=False) -> None:
    """Member ``k``'s designed scores of ``splits`` into the store, less a video or frame."""
    for split in splits:
        for video, rows in encoded_rows(root, split, k, dominance).items():
            if video != drop_video:
                store.write_video(key, split, video, [
                    r for r in rows if f"{video}/{r['frame']}" != drop_frame])
    store.write_manifest(key, manifest)


def manifest(key: str, vid: str, family: str, root, *, metrics=None, **changes) -> dict:
    from vspw_ray.data import load_class_table
    from vspw_ray.data.fingerprint import split_fingerprint

    table = load_class_table(root)
    out = {"key": key, "variant_id": vid, "checkpoint": f"/ckpt/{vid}", "family": family,
           "data_fingerprint": split_fingerprint(str(root), "val"),
           "train_split": "train", "fold_seed": 0, "class_names": list(table.names),
           "num_classes": C, "encoding": {"name": "topk-logq-u8", "params": ENC},
           "splits": {"val": {"metrics": metrics or {}}}}
    return {**out, **changes}


def stored_metrics(store, key: str, root) -> dict:
    from vspw_ray.evaluate import evaluate_store_folds

    folds = evaluate_store_folds(store.uri, key, root, "val", fold_seed=0, processes=1)
    return {f"val_{f}/miou": folds[f]["miou"] for f in ("A", "B")}


def experiment(root, storage, *overrides, groups=GROUPS, variants=VARIANTS):
    data = to_dict(load_config(EXPERIMENT, [f"data.root={root}", f"storage.path={storage}",
                                            "ensemble.sample_rate=0.1", *overrides]))
    data["variants"] = variants
    data["ensemble"]["groups"] = groups
    return config_from_dict(data)


@pytest.fixture(scope="module")
def storage(tmp_path_factory, synth_root) -> Path:
    """Runs with a training checkpoint per variant and the designed scores in the store, plus
    broken members (named by store key) for the error tests."""
    from vspw_ray.checkpoints import write_checkpoint
    from vspw_ray.data.fingerprint import split_fingerprint
    from vspw_ray.ids import member_key
    from vspw_ray.layout import RunLayout
    from vspw_ray.scores import ScoreStore

    runs = tmp_path_factory.mktemp("ensemble") / "runs"
    cfg, layout = experiment(synth_root, runs), RunLayout(str(runs))
    store = ScoreStore(layout.scores)
    for k, spec in enumerate(VARIANTS):
        resolved = resolve_variant(cfg, spec["name"])
        vid = variant_id(resolved)
        write_checkpoint(f"{layout.train_run(vid)}/checkpoint_000000", {
            "variant_id": vid, "iteration": 10, "kind": "train", "config": to_dict(resolved),
            "metrics": {"val_A/miou": 0.5}})
        key = member_key(vid, 10, resolved.infer, split_fingerprint(str(synth_root), "val"))
        info = manifest(key, vid, resolved.model.family, synth_root)
        write_member(store, synth_root, key, k, info)
        write_member(store, synth_root, key, k, {**info, "splits": {"val": {
            "metrics": stored_metrics(store, key, synth_root)}}})
    good = {"metrics": {"val_A/miou": 0.5}}
    write_member(store, synth_root, "short", 0, manifest("short", "x", "upernet", synth_root, **good),
                 drop_video="synth_003_00004")
    write_member(store, synth_root, "gappy", 0, manifest("gappy", "x", "upernet", synth_root, **good),
                 drop_frame="synth_003_00005/00000003")
    write_member(store, synth_root, "relabelled", 0, manifest(
        "relabelled", "x", "upernet", synth_root, class_names=list("abcdef"), **good))
    write_member(store, synth_root, "seed1", 0, manifest("seed1", "x", "upernet", synth_root,
                                                         fold_seed=1, **good))
    write_member(store, synth_root, "testonly", 0, manifest("testonly", "x", "upernet", synth_root,
                                                            **good), splits=("test",))
    write_member(store, synth_root, "leaky", 1, manifest("leaky", "x", "upernet", synth_root,
                                                         train_split="val", **good))
    write_member(store, synth_root, "otherdata", 0, manifest(
        "otherdata", "x", "upernet", synth_root, data_fingerprint="0123456789ab", **good))
    for k, (name, family) in enumerate((("oracle", "upernet"), ("noisy1", "upernet"),
                                        ("noisy2", "maskformer"))):
        info = manifest(name, name, family, synth_root)
        write_member(store, synth_root, name, k, info, dominance=True)
        write_member(store, synth_root, name, k, {**info, "splits": {"val": {
            "metrics": stored_metrics(store, name, synth_root)}}}, dominance=True)
    return runs


def near(weights: dict, tol: float) -> bool:
    return abs(weights["weak"] - A_STAR) <= tol and abs(weights["aux"] - B_STAR) <= tol


def test_grid_recovers_the_weights_and_the_submission_scores_as_reported(
        ray_local, synth_root, storage):
    from vspw_ray.data import read_split, split_folds
    from vspw_ray.ensemble.core.grid import grid_search_store
    from vspw_ray.evaluate import evaluate_predictions
    from vspw_ray.metrics import mean_iou

    cfg = experiment(synth_root, storage, "ensemble.method=grid")
    out = run_ensemble(cfg, apply="val", track=False)
    assert out.searched and out.method == "grid"
    assert out.weights == pytest.approx({"weak": A_STAR, "aux": B_STAR})
    assert list(out.groups) == ["strong", "weak", "aux"]
    report, figures = out.report, out.report["figures"]
    assert report["selection_mode"] == "crossfit" and out.report["search"]["A"]["points"] == 441
    # cross-fitting: each fold on its own recovers the designed optimum
    for fit in ("A", "B", "all"):
        chosen = report["fits"][fit]["candidate"]
        assert chosen["kind"] == "searched" and chosen["weights"] == pytest.approx(
            {"weak": A_STAR, "aux": B_STAR}), fit
    assert figures["ensemble"]["A"]["miou"] == pytest.approx(1.0, abs=0.002)
    # the designed landscape: equal weights and (0, 0) each at least a point worse on fold A
    rows = [r for r in _csv_rows(out.path) if r["fit"] == "A"]
    by_point = {(r["weak"], r["aux"]): r["val_A_miou"] for r in rows}
    assert max(by_point.values()) - by_point[1.0, 1.0] >= 0.01
    assert max(by_point.values()) - by_point[0.0, 0.0] >= 0.01
    # the exact rescoring of fold A's choice is the grid's figure at that point, bit for bit
    number = int(report["fits"]["A"]["chosen"].split("#")[1].split("@")[0])
    assert report["fits"]["A"]["score"] == pytest.approx(
        next(r["val_A_miou"] for r in rows if r["number"] == number), abs=1e-12)
    # out of fold: fold B's choice on A plus fold A's choice on B, recomputed by the grid pass
    folds = dict(zip("AB", split_folds(read_split(synth_root, "val"), 0)))
    oof = sum(grid_search_store(str(storage / "scores"), out.groups, "val", folds[f],
                                str(synth_root), np.array([[A_STAR, B_STAR]]), processes=1)[0]
              for f in "AB")
    np.testing.assert_array_equal(np.array(report["out_of_fold"]["ensemble"]["confusion"]), oof)
    assert report["out_of_fold"]["ensemble"]["miou"] == pytest.approx(mean_iou(oof), abs=1e-12)
    for v in ("single", "mean"):
        assert report["out_of_fold"]["ensemble"]["miou"] - report["out_of_fold"][v]["miou"] > 0.01
    best = report["best_single"]
    single = report["out_of_fold"]["single"]["miou"]  # the best member on all of val
    assert single == max(c["miou"]["all"] for c in report["candidates"] if c["kind"] == "single")
    assert [c for c in report["candidates"] if c["groups"] == {"single": [best]}]
    # per-video matrices (what the intervals resample) sum to the folds' matrices
    with np.load(Path(out.path) / "video_confusions.npz") as z:
        for v in ("ensemble", "single", "mean"):
            for fold in "AB":
                assert np.array_equal(sum(z[f"{v}/{video}"] for video in folds[fold]),
                                      np.array(figures[v][fold]["confusion"]))
    assert report["intervals"]["ensemble_minus_single"]["low"] > 0  # over both val videos
    _check_submission(out, synth_root, evaluate_predictions)
    manifest = json.loads((Path(out.submission.folder) / "manifest.json").read_text())
    assert all(m["checkpoint"].endswith("checkpoint_000000/checkpoint.pt")
               for m in manifest["members"])

    # a re-run reuses the weights and the complete submission; a half-written one is finished
    sub = Path(out.submission.folder)
    again = run_ensemble(cfg, apply="val", track=False)
    assert not again.searched and again.weights == out.weights
    assert again.submission.written == 0
    (sub / "manifest.json").unlink()
    (sub / "synth_003_00005" / "00000007.png").unlink()
    (sub / "synth_003_00005" / ".tmp-00000008.png").write_bytes(b"cut off")
    third = run_ensemble(cfg, apply="val", track=False)
    assert third.submission.written == 1 and (sub / "manifest.json").is_file()
    assert not list(sub.glob("*/.tmp-*"))
    # a member without the requested split
    with pytest.raises(UserError, match="has no scores for split 'test'"):
        run_ensemble(cfg, apply="test", track=False)


def _check_submission(out, synth_root, evaluate_predictions) -> None:
    """The submission's PNGs, scored by `vspw-ray evaluate`, give the report's figures of the
    applied fusion (chosen on all of val) on both folds: mIoU, fwIoU, VC8 and VC16, each
    defined on these 18-frame videos."""
    sub, applied = Path(out.submission.folder), out.report["applied_figures"]
    for fold in ("A", "B"):
        scored = evaluate_predictions(sub, synth_root, "val", fold=fold, fold_seed=0,
                                      processes=1)
        for k in ("miou", "fwiou", "vc8", "vc16"):
            assert applied[fold][k] is not None, (fold, k)
            assert scored[k] == pytest.approx(applied[fold][k], abs=1e-12), (fold, k)
    with zipfile.ZipFile(out.submission.zip) as z:
        names = sorted(z.namelist())
    assert names == sorted(str(p.relative_to(sub)) for p in sub.glob("*/*.png"))
    assert len(names) == 36 and names[0] == "synth_003_00004/00000000.png"
    manifest = json.loads((sub / "manifest.json").read_text())
    assert manifest["weights"] == out.weights and manifest["method"] == out.method
    assert manifest["chosen"] == out.report["chosen"]["name"]
    assert [m["key"] for m in manifest["members"]] == [
        k for ms in out.groups.values() for k in ms]


@pytest.mark.slow(20)
def test_tune_recovers_the_weights_and_tracks_the_trials_as_child_runs(
        ray_local, synth_root, storage):
    import mlflow
    import optuna

    # TPE with 32 trials lands within 0.2 of the optimum on this landscape (bare Optuna loops
    # over 16 seeds: at most 0.17 off); each 0.1 off costs about a point of fold-A mIoU
    n = 32
    cfg = experiment(synth_root, storage, "ensemble.method=tune", f"ensemble.num_samples={n}",
                     "ensemble.sample_rate=0.3", "ensemble.selection=holdout")
    out = run_ensemble(cfg, track=True)
    assert near(out.weights, 0.2), out.weights
    figures = out.report["figures"]["ensemble"]
    assert figures["A"]["miou"] > 0.97
    search = out.report["search"]["A"]
    assert search["trials"] == n and search["trials_per_s"] > 0
    assert not search["inner_weights"]  # one member per group: nothing to share
    # the study lives where `vspw-ray tune` keeps its studies, one per fit
    study = optuna.load_study(study_name=f"{out.ensemble_id}-A",
                              storage=f"sqlite:///{storage / 'tune' / 'optuna.db'}")
    assert len(study.trials) == n and study.best_value == max(
        r["val_A_miou"] for r in _csv_rows(out.path))

    client = mlflow.tracking.MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    run = client.get_run(out.run_id)
    assert run.data.tags["stage"] == "ensemble" and run.data.tags["ensemble_id"] == out.ensemble_id
    assert run.data.params["method"] == "tune"
    assert json.loads(run.data.params["weights"]) == pytest.approx(out.weights)
    assert json.loads(run.data.params["groups"]) == out.groups
    assert run.data.metrics["final/val_B/miou"] == pytest.approx(figures["B"]["miou"])
    assert "single/val_A/miou" in run.data.metrics and "mean/val_B/vc8" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"report.json", "report.txt", "trials.csv", "weights_heatmap.png",
            "per_class_change.png", "candidates.png"} <= artifacts
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{out.run_id}'")
    assert len(children) == n
    assert {c.data.tags["optuna_trial"] for c in children} == {str(t.number) for t in study.trials}
    assert {c.data.tags["fit"] for c in children} == {"A"}


def _csv_rows(folder: str) -> list[dict]:
    import csv

    with open(Path(folder) / "trials.csv") as f:
        return [{k: v if k == "fit" else float(v) for k, v in r.items() if v}
                for r in csv.DictReader(f)]


def test_greedy_recovers_the_weights_over_single_members(ray_local, synth_root, storage):
    cfg = experiment(synth_root, storage, "ensemble.method=greedy", "ensemble.greedy_rounds=20")
    out = run_ensemble(cfg, track=False)
    keys = {m["name"]: m["key"] for m in out.report["members"]}
    for fit in ("A", "B", "all"):
        chosen = out.report["fits"][fit]["candidate"]
        weights = {next(iter(chosen["groups"])): 1.0, **chosen["weights"]}
        assert set(chosen["groups"]) <= set(keys.values()) and keys["strong"] in weights
        ratio = {name: weights.get(keys[name], 0.0) / weights[keys["strong"]] for name in keys}
        assert near(ratio, 0.1), (fit, ratio)
        rows = [r for r in _csv_rows(out.path) if r["fit"] == fit]
        assert rows[-1]["val_A_miou"] == max(r["val_A_miou"] for r in rows)
    assert out.report["out_of_fold"]["ensemble"]["miou"] > 0.99
    assert out.report["search"]["all"]["init"] == 1

    # bagged: the applied fusion's member weights are the mean of the bags' shares
    bagged = run_ensemble(experiment(synth_root, storage, "ensemble.method=greedy",
                                     "ensemble.greedy_rounds=20", "ensemble.bags=3"), track=False)
    stats = bagged.report["search"]["all"]
    shares = [{m: n / sum(b.values()) for m, n in b.items()} for b in stats["bags"]]
    mean = {k: sum(s.get(k, 0.0) for s in shares) / len(shares) for k in keys.values()}
    found = []  # identical bags of several fits are one candidate, named after the first
    for cand in bagged.report["candidates"]:
        if cand["name"].startswith("bagged#3@"):
            weights = _member_weights(cand)
            total = sum(weights.values())
            found.append({k: w / total for k, w in weights.items()})
    assert {k: v for k, v in mean.items() if v} in [pytest.approx(f) for f in found]
    assert len(stats["bags"]) == 3 and bagged.report["out_of_fold"]["ensemble"]["miou"] > 0.97


def _member_weights(candidate: dict) -> dict[str, float]:
    from vspw_ray.ensemble.core.candidates import Candidate

    c = Candidate(candidate["name"], candidate["kind"], candidate["groups"],
                  candidate["weights"], candidate.get("inner") or {})
    return {k: v for k, v in c.member_weights().items() if v > 0}


@pytest.mark.parametrize("method, selection", [
    ("grid", "holdout"), ("tune", "crossfit"), ("greedy", "crossfit")])
def test_an_ensemble_never_loses_to_a_dominating_member(ray_local, synth_root, storage, method,
                                                        selection):
    """The seed's groups with strong = 2 put the oracle and a noisy member in the base group:
    no group weight makes a mix reach the oracle alone (checked below for the grid), so every
    fit must choose the oracle alone, and the figures it reports are at least the oracle's."""
    cfg = experiment(synth_root, storage, f"ensemble.method={method}",
                     f"ensemble.selection={selection}", "ensemble.members=[oracle,noisy1,noisy2]",
                     "ensemble.strong=2", "ensemble.auxiliary=1", "ensemble.num_samples=8",
                     groups={})
    out = run_ensemble(cfg, apply="val" if method == "grid" else None, track=False)
    report = out.report
    oracle = next(c for c in report["candidates"] if c["name"] == "single:oracle")["miou"]
    for fit, ch in report["fits"].items():
        assert _member_weights(ch["candidate"]) == {"oracle": pytest.approx(1.0)}, fit
        assert ch["score"] == oracle[fit] and oracle[fit] < 0.99
    assert _member_weights(report["chosen"]) == {"oracle": pytest.approx(1.0)}
    searched = [c for c in report["candidates"] if c["kind"] == "searched"]
    if method == "grid":  # where the property can fail: S + w A is always below the oracle
        assert max(c["miou"]["A"] for c in searched) < oracle["A"] - 0.02
        assert report["selection_mode"] == "holdout" and report["out_of_fold"] is None
        assert report["intervals_over"] == "fold B videos" and report["intervals"] == {}
        for f in ("A", "B"):
            assert report["figures"]["ensemble"][f]["confusion"] == \
                report["figures"]["single"][f]["confusion"]
        from vspw_ray.evaluate import evaluate_predictions

        _check_submission(out, synth_root, evaluate_predictions)
        _old_report_still_reads(cfg, out)
    else:
        assert report["out_of_fold"]["ensemble"]["miou"] == pytest.approx(
            report["out_of_fold"]["single"]["miou"], abs=1e-12)
    if method == "tune":  # shares inside the strong group were searched
        assert report["search"]["A"]["inner_weights"]
        assert any(c["inner"] for c in searched)


def _old_report_still_reads(cfg, out) -> None:
    """A report written before cross-fitting (no mode, no candidates, fold-B intervals) is
    reused as it is: its weights applied, its text printed."""
    import shutil

    path = Path(out.path) / "report.json"
    report = json.loads(path.read_text())
    old = {k: v for k, v in report.items() if k not in (
        "selection_mode", "inner", "order", "chosen", "fits", "candidates", "out_of_fold",
        "applied_figures", "disagreement", "disagreement_flag", "agreement", "intervals",
        "intervals_over")}
    old["fold_b_intervals"] = {}
    path.write_text(json.dumps(old))
    from vspw_ray.ensemble.report import format_report, report_metrics

    assert "chosen on fold A, reported on fold B" in format_report(old, "")
    assert report_metrics(old)["final/val_B/miou"] == old["figures"]["ensemble"]["B"]["miou"]
    sub = Path(out.submission.folder)
    before = {p.relative_to(sub): p.read_bytes() for p in sub.glob("*/*.png")}
    shutil.rmtree(sub)
    again = run_ensemble(cfg, apply="val", track=False)
    assert not again.searched and again.groups == out.groups and again.weights == out.weights
    assert again.submission.written == 36
    assert {p.relative_to(sub): p.read_bytes() for p in sub.glob("*/*.png")} == before


def test_leakage_guard_refuses_or_flags_a_member_trained_on_val(ray_local, synth_root, storage):
    base = ["ensemble.members=[strong,leaky]", "ensemble.strong=1", "ensemble.method=grid",
            "ensemble.grid_step=1.0"]
    with pytest.raises(UserError, match=r"leaky: 'val' shares 2 videos with 'val' "
                                        r"\(synth_003_00004, synth_003_00005\)"):
        run_ensemble(experiment(synth_root, storage, *base, groups={}), track=False)
    out = run_ensemble(experiment(synth_root, storage, *base, "ensemble.allow_val_trained=true",
                                  groups={}), track=False)
    assert out.report["val_trained"] == {"leaky": ["synth_003_00004", "synth_003_00005"]}
    assert "FLAGGED: member leaky" in out.summary
    keys = {m["name"]: m["key"] for m in out.report["members"]}
    assert out.groups == {"strong": [keys["strong"]], "weak": ["leaky"]}  # the seed's rule


def _bad(root, storage, *overrides, groups=GROUPS):
    return experiment(root, storage, *overrides, groups=groups)


@pytest.mark.parametrize("overrides, groups, message", [
    (["ensemble.members=[strong,nope]"], {}, r"'nope' is neither a variant of experiment"),
    (["ensemble.members=[strong]"], {}, r"at least two members, got \['strong \("),
    (["ensemble.members=[strong,short]"], {}, r"member short holds other val videos .* lacking "
                                              r"\['synth_003_00004'\]"),
    (["ensemble.members=[strong,relabelled]"], {}, r"class table .*'relabelled'"),
    (["ensemble.members=[strong,seed1]"], {}, r"fold seed other than 0: \{'seed1': 1\}"),
    (["ensemble.members=[strong,testonly]"], {}, r"member testonly has no scores for split 'val'"),
    (["ensemble.members=[strong,otherdata]"], {}, r"member otherdata holds scores of data with "
                                                  r"fingerprint 0123456789ab, not of split 'val'"),
    ([], {"strong": ["strong"], "weak": ["nope"]}, r"ensemble.groups.weak': 'nope' is not an "
                                                    r"ensemble member"),
    ([], {"strong": ["strong", "weak"], "weak": ["weak"]}, r"in groups 'strong' and 'weak'"),
    (["ensemble.grid_step=0.3"], GROUPS, r"grid_step': 0.3 does not divide"),
    (["ensemble.members=[strong,weak]", "ensemble.strong=5"], {}, r"has one group"),
])
def test_bad_input_is_named_before_ray_starts(synth_root, storage, overrides, groups, message):
    cfg = _bad(synth_root, storage, *overrides, groups=groups)
    with pytest.raises(UserError, match=message):
        run_ensemble(cfg, track=False)


def test_more_bad_input(ray_local, synth_copy, synth_root, storage, tmp_path, capsys):
    from vspw_ray.cli import main
    from vspw_ray.config import ConfigError, dump_yaml

    with pytest.raises(ConfigError, match="weight_range"):
        _bad(synth_root, storage, "ensemble.weight_range=[-1,2]")
    # members holding different frames of a video: named when the pass meets them
    cfg = _bad(synth_root, storage, "ensemble.members=[strong,gappy]", "ensemble.method=grid",
               "ensemble.grid_step=1.0", groups={"strong": ["strong"], "weak": ["gappy"]})
    with pytest.raises(UserError, match=r"'gappy' hold different frames of val video "
                                        r"'synth_003_00005'"):
        run_ensemble(cfg, track=False)
    # a split without masks where scores are needed (other data than the variants': store keys)
    (synth_copy / "data" / "synth_003_00005" / "mask" / "00000004.png").unlink()
    with pytest.raises(UserError, match=r"synth_003_00005' frame '00000004'.* against its masks"):
        run_ensemble(_bad(synth_copy, storage, "ensemble.members=[oracle,noisy1]",
                          groups={"strong": ["oracle"], "weak": ["noisy1"]}), track=False)
    # the command line prints the error in one line and exits 2
    path = tmp_path / "exp.yaml"
    path.write_text(dump_yaml(_bad(synth_root, storage, "ensemble.members=[strong,nope]")))
    assert main(["ensemble", str(path), "--no-track"]) == 2
    assert "error: config key 'ensemble.members': 'nope'" in capsys.readouterr().err


def test_naming_every_member_is_the_default_ensemble_and_another_member_set_is_not(synth_root):
    """The ensemble's identity counts ``ensemble.members`` through the store keys it selects:
    naming all variants reuses the default ensemble's weights; dropping one gives another."""
    from vspw_ray.ensemble.members import Member, ensemble_id
    from vspw_ray.stages import ensemble as ensemble_stage

    def member(name):
        return Member(name, f"key-{name}", f"vid-{name}", None, "upernet", "train", 0, 0.5, C,
                      tuple(map(str, range(C))))

    cfg = load_config(EXPERIMENT, [f"data.root={synth_root}"])
    named = config_from_dict({**to_dict(cfg), "ensemble": {
        **to_dict(cfg.ensemble), "members": ["b", "a", "c"]}})
    everyone = [member(n) for n in "abc"]
    assert ensemble_id(named, everyone) == ensemble_id(cfg, everyone)
    assert ensemble_stage.key(named, [m.key for m in everyone]) == ensemble_stage.key(
        cfg, [m.key for m in everyone])
    assert ensemble_id(named, everyone[:2]) != ensemble_id(cfg, everyone)
    moved = config_from_dict({**to_dict(cfg), "ensemble": {**to_dict(cfg.ensemble),
                                                           "grid_step": 0.25}})
    assert ensemble_id(moved, everyone) != ensemble_id(cfg, everyone)


def test_the_submission_reads_each_members_scores_of_the_applied_split(synth_root):
    """A member key covers one split's data: applying the fusion chosen on val to test moves
    every key of the report (groups, inner shares, decode order) to the same checkpoint's test
    member; val keeps its keys."""
    from vspw_ray.data.fingerprint import split_fingerprint
    from vspw_ray.ensemble.members import Member
    from vspw_ray.ensemble.stage import _Context, _rekeyed
    from vspw_ray.ids import member_key

    cfg = load_config(EXPERIMENT, [f"data.root={synth_root}"])
    val, test = (split_fingerprint(str(synth_root), s) for s in ("val", "test"))
    keys = {n: member_key(f"up-{n}", 10, cfg.infer, val) for n in ("s", "w")}
    members = [Member(n, k, f"up-{n}", None, "upernet", "train", 0, 0.5, C, ())
               for n, k in keys.items()]
    ctx = _Context(cfg, None, members, {}, {}, {}, {}, "e", None)
    report = {"groups": {"strong": [keys["s"]], "weak": [keys["w"]]}, "inner": {keys["w"]: 1.0},
              "order": [keys["w"], keys["s"]], "weights": {"weak": 0.5}}
    moved, out, data = _rekeyed(ctx, report, "test")
    want = {n: member_key(f"up-{n}", 10, cfg.infer, test) for n in ("s", "w")}
    assert data == test and [m.key for m in moved.members] == [want["s"], want["w"]]
    assert out["groups"] == {"strong": [want["s"]], "weak": [want["w"]]}
    assert out["inner"] == {want["w"]: 1.0} and out["order"] == [want["w"], want["s"]]
    assert _rekeyed(ctx, report, "val") == (ctx, report, val)
