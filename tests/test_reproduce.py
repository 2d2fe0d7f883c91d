"""benchmarks/reproduce_camvid.py: the seed's ablation rows on real CamVid frames, through the
pipeline (the smoke run, 1 seed), its numbers traced to the stages' MLflow runs, and the same
rows at VSPW's sizes planned without Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# the smoke run (~170 s) is set up once, by the first test using it
pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow(35)]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "reproduce_camvid.py"


def _module():
    spec = importlib.util.spec_from_file_location("reproduce_camvid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def smoke(camvid_root, tmp_path_factory):
    """The smoke run on CamVid: ``(storage, stdout, results.json)``."""
    storage = tmp_path_factory.mktemp("reproduce") / "runs"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--root", str(camvid_root),
                          "--storage", str(storage)], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return storage, out.stdout, json.loads((storage / "reproduce" / "results.json").read_text())


def _own_runs(runs, variant: str, stage: str) -> list:
    """The ``stage`` runs of the row ``variant`` (``upernet_c240`` for the pipeline's
    ``upernet_c240_s0``; the smoke has one seed), each named ``<its variant>/<stage>`` in
    MLflow and tagged with its variant's name."""
    own = [r for r in runs if r.data.tags.get("stage") == stage and
           r.data.params.get("pipeline_variant", "").rsplit("_s", 1)[0] == variant]
    for r in own:
        name = r.data.params["pipeline_variant"]
        suffix = f"infer-{r.data.tags['split']}" if stage == "infer" else stage
        assert (r.info.run_name, r.data.tags["variant"]) == (f"{name}/{suffix}", name)
    return own


def test_smoke_rows_are_the_stages_tracked_figures(smoke):
    import mlflow

    storage, stdout, results = smoke
    tables = results["tables"]
    # the smoke's 3 variants: no OHEM, LA or SD row, so no Tables 4 and 5
    assert sorted(t.split(":")[0] for t in tables) == ["TTA", "Table 1", "Table 2", "Table 3"]
    assert [r["id"] for r in tables["Table 1: crop size and OHEM (UperNet)"]] == [
        "upernet_c180", "upernet_c240"]
    assert all(r["seeds"] == 1 for rows in tables.values() for r in rows)
    mlflow.set_tracking_uri(f"sqlite:///{storage / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["camvid_ablations"], output_format="list")
    # the TTA'd members (Table 1, TTA) are inference runs' tracked fold-B figures; the
    # single-scale rows (Table 2, TTA's baselines) the training and SWA runs' own validation,
    # recomputed from the per-video matrices saved beside their checkpoints
    rows = {r["id"]: r for title in tables if not title.startswith("Table 3")
            for r in tables[title]}
    expected = {"upernet_c180": "infer", "upernet_c240": "infer", "upernet_c240:tta": "infer",
                "maskformer_c240:tta": "infer", "upernet_c240:train": "train",
                "maskformer_c240:train": "train", "upernet_c240:swa": "swa",
                "maskformer_c240:swa": "swa", "upernet_c240:single": "swa",
                "maskformer_c240:single": "swa"}
    assert rows.keys() == expected.keys()
    for row_id, stage in expected.items():  # each row is its own variant's run, no other's
        own = _own_runs(runs, row_id.split(":")[0], stage)
        assert own and min(abs(rows[row_id]["B"] - r.data.metrics["final/val_B/miou"])
                           for r in own) < 1e-9, row_id
    ensembles = [r for r in runs if r.data.tags.get("stage") == "ensemble"]
    table3 = {r["id"]: r for r in tables["Table 3: hierarchical ensemble (per seed)"]}
    assert list(table3) == ["single", "mean", "S", "SA", "grid", "greedy"]
    for method in ("grid", "greedy"):  # each method's row is its tracked ensemble run's
        assert any(abs(r.data.metrics["final/val_B/miou"] - table3[method]["B"]) < 1e-9 and
                   abs(r.data.metrics["oof/ensemble/miou"] - table3[method]["all"]) < 1e-9 and
                   r.data.params["method"] == method and r.info.run_name == f"ensemble/{method}"
                   for r in ensembles), method
    assert "## Claims" in stdout and json.loads(stdout.strip().splitlines()[-1])["metric"]


def test_smoke_pipeline_runs_compare_in_mlflow_and_a_rerun_has_nothing_to_do(smoke, camvid_root):
    """Issue 16's end-to-end checks on the smoke's pipeline: the stage runs are children of one
    parent with the common keys, and the plan afterwards (from storage alone) runs nothing. (A
    student waiting for its teacher: tests/test_pipeline.py.)"""
    import time

    import mlflow

    from vspw_ray.config import dump_yaml
    from vspw_ray.pipeline.run import plan_pipeline

    storage, _, _ = smoke
    module = _module()
    cfg, _ = module.build_config(module.parse_args(["--smoke", "--root", str(camvid_root),
                                                    "--storage", str(storage)]))
    start = time.perf_counter()
    _, steps = plan_pipeline(cfg)
    assert time.perf_counter() - start < 10 and not [s.id for s in steps if s.run]
    # the same from the command line: it says so and starts no Ray
    path = storage.parent / "smoke.yaml"
    path.write_text(dump_yaml(cfg))
    # Ray's folder for these commands alone (short: Ray's socket paths have a limit): whatever
    # other tests run beside this one, a session made here was made by these commands
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "RAY_TMPDIR": str(ray_tmp)}
    rerun = subprocess.run([sys.executable, "-m", "vspw_ray", "pipeline", str(path)],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "nothing to do: every step is done" in rerun.stdout, rerun.stdout[-2000:]
    assert "started a local Ray instance" not in rerun.stderr, rerun.stderr[-2000:]
    assert not list(ray_tmp.rglob("session_*"))  # no Ray session was made
    mlflow.set_tracking_uri(f"sqlite:///{storage / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["camvid_ablations"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("stage") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert parents[0].info.run_name == "camvid_ablations/pipeline"
    assert len(parents) == 1 and sorted({r.data.tags["stage"] for r in children}) == [
        "ensemble", "infer", "swa", "train"]
    for run in children:
        if run.data.tags["stage"] != "ensemble":
            assert "final/val_A/miou" in run.data.metrics and "final/val_B/miou" in run.data.metrics
            assert {"family", "crop", "ohem", "tau", "distill", "swa", "tta"} <= set(run.data.params)
        # measured: wall x what it held (CPU workers or actors here), no GPU
        cost = run.data.metrics
        assert cost["cost/wall_s"] > 0 and cost["cost/cpu_hours"] > 0, run.data.tags["stage"]
        assert cost["cost/gpu_hours"] == 0
    parent = parents[0].data.metrics  # the stages' resources summed on the parent
    assert parent["cost/cpu_hours"] == pytest.approx(
        sum(r.data.metrics["cost/cpu_hours"] for r in children))
    assert parent["cost/train/wall_s"] == pytest.approx(
        sum(r.data.metrics["cost/wall_s"] for r in children if r.data.tags["stage"] == "train"))

    # where the experiment stands, from storage alone: every step done, with its figure and
    # measured cost (no Ray: the session set above is unchanged)
    status = subprocess.run([sys.executable, "-m", "vspw_ray", "status", str(path), "--json"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    rows = json.loads(status.stdout)
    assert {r["state"] for r in rows} == {"done"} and len(rows) == len(steps)
    for row in rows:
        if not row["step"].startswith("data:"):
            assert row["value"] is not None and row["cpu_hours"] > 0, row
    assert not list(ray_tmp.rglob("session_*"))
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_smoke_claims_follow_their_intervals(smoke):
    _, _, results = smoke
    assert len(results["claims"]) == 7  # 10 of the full run less OHEM's, LA's and SD's
    for c in results["claims"]:
        assert c["diff_B_low"] <= c["diff_B_value"] + 1e-12
        assert c["diff_B_value"] <= c["diff_B_high"] + 1e-12
        expected = ("held" if c["diff_B_low"] > 0 else "reversed" if c["diff_B_high"] < 0
                    else "undecided (noise)")
        assert c["verdict"] == expected


def test_the_ensemble_on_real_members_is_at_least_the_best_single_where_it_was_chosen(smoke):
    """Issue 27 on real members: CamVid members of both families, inferred with the pipeline,
    grouped by the seed's rule with two members in the strong group (no group weight gives
    the best member alone); every method's choice on every fit is at least the best single
    member on the folds that chose it, on exact figures."""
    _, stdout, results = smoke
    choices = [r for r in results["choices"] if "fit" in r]
    assert {(r["method"], r["fit"]) for r in choices} == {
        (m, f) for m in ("grid", "greedy") for f in ("A", "B", "all")}
    for r in choices:
        assert r["score"] >= r["best_single"] - 1e-12, r
    rows = {r["id"]: r for r in results["tables"]["Table 3: hierarchical ensemble (per seed)"]}
    assert rows["S"]["label"] == "S (mean of 2)"  # the strong group holds two members
    assert "at least the best single member" in stdout


def test_the_same_rows_at_vspw_sizes_plan_for_gpus(tmp_path, synth_root):
    """Planned without Ray on a VSPW-layout set (ids cover the data's fingerprint, so the plan
    needs one: the suite's synthetic set stands in for VSPW_480p)."""
    from vspw_ray.pipeline.run import plan_pipeline

    module = _module()
    args = module.parse_args(["--sizes", "vspw", "--root", str(synth_root), "--storage",
                              str(tmp_path / "runs")])
    cfg, seeds = module.build_config(args)
    assert seeds == 2 and cfg.model.backbone.startswith("swin_large")
    crops = {v.name: v.overrides["data.crop_size"] for v in cfg.variants}
    assert crops["upernet_c180_s0"] == [480, 480] and crops["maskformer_c240_s1"] == [640, 640]
    by_name = {v.name: v.overrides for v in cfg.variants}
    assert by_name["upernet_c240_ohem_s0"]["loss.ohem.min_kept"] == 200000
    assert by_name["maskformer_c240_s0"] == {"data.crop_size": [640, 640],
                                             "model.family": "maskformer"}
    _, steps = plan_pipeline(cfg)
    trains = [s for s in steps if s.stage == "train"]
    assert len(trains) == 12 and all("GPU 1" in s.resources for s in trains)
    assert [s.id for s in steps][-1] == "ensemble:all"
    assert all(s.gpu_hours and s.gpu_hours > 0 for s in trains)  # estimated from step rates
