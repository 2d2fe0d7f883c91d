"""`vspw-ray status`: each step's state from storage alone -- records, running markers -- with
its headline figure and measured cost, without starting Ray or loading torch or MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.test_pipeline import ONE_VARIANT, _tiny_experiment
from vspw_ray.config import load_config
from vspw_ray.layout import RunLayout
from vspw_ray.pipeline.plan import build_plan
from vspw_ray.pipeline.status import experiment_status, format_status
from vspw_ray.stages.records import read_marker, write_marker, write_record

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has it (pids are not reused this soon)


def test_each_state_comes_from_records_and_markers_alone(tmp_path, synth_root):
    exp = _tiny_experiment(tmp_path, variants=ONE_VARIANT, splits="[val]",
                           swa="extra_iters: 8, every: 4")
    overrides = [f"data.root={synth_root}", f"storage.path={tmp_path / 'runs'}"]
    cfg = load_config(exp, overrides)
    layout = RunLayout(str(tmp_path / "runs"))
    steps = {s.id: s for s in build_plan(cfg, layout)}
    assert list(steps) == ["data:all", "train:upernet_crop64", "swa:upernet_crop64",
                           "infer:upernet_crop64/val"]
    write_record(layout, cfg.name, "data:all", steps["data:all"].key)
    write_record(layout, cfg.name, "train:upernet_crop64", steps["train:upernet_crop64"].key,
                 {"final/val_A/miou": 0.4321, "cost/gpu_hours": 0.5, "cost/cpu_hours": 2.0,
                  "cost/wall_s": 3600.0})
    write_record(layout, cfg.name, "swa:upernet_crop64", "an-older-key")  # settings changed
    infer = steps["infer:upernet_crop64/val"]
    write_marker(layout, cfg.name, infer.id, infer.key, time.time() - 120)  # this process runs it

    rows = {r.step: r for r in experiment_status(cfg)}
    assert [rows[s].state for s in steps] == ["done", "done", "stale", "running"]
    train = rows["train:upernet_crop64"]
    assert (train.headline, train.value, train.gpu_hours, train.cpu_hours, train.wall_s) == (
        "final/val_A/miou", 0.4321, 0.5, 2.0, 3600.0)
    assert "an-older-key" in rows["swa:upernet_crop64"].detail
    assert "for 2 min" in rows[infer.id].detail
    table = format_status(list(rows.values()))
    assert "val_A 43.21" in table and "2 done, 1 running, 1 stale of 4 steps" in table

    # the process that ran it is gone (killed): its marker no longer counts as running
    marker = read_marker(layout, cfg.name, infer.id)
    write_marker(layout, cfg.name, infer.id, infer.key, marker["started_at"])
    path = Path(layout.pipeline_record(cfg.name, infer.id).removesuffix(".json") + ".running.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "pid": _dead_pid()}))
    again = {r.step: r for r in experiment_status(cfg)}[infer.id]
    assert again.state == "missing" and "its last run stopped" in again.detail

    # the command line: the same rows as JSON, with no Ray, torch or MLflow loaded
    code = ("import sys, runpy; sys.argv = ['vspw-ray', 'status', '--json', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('vspw_ray', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('LOADED', [m for m in ('ray', 'torch', 'mlflow') if m in sys.modules])")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code, str(exp), *overrides], capture_output=True,
                         text=True, cwd=REPO, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    printed, loaded = out.stdout.rsplit("LOADED", 1)
    assert loaded.strip() == "[]"
    assert [(r["step"], r["state"]) for r in json.loads(printed)] == [
        (s, again.state if s == infer.id else rows[s].state) for s in steps]


def test_the_ensemble_is_known_by_its_honest_figure_never_by_its_selecting_fold():
    """A model step by fold A (the fold that chose its checkpoint); the ensemble by its
    out-of-fold mIoU over all of val (cross-fitted), else by fold B (hold-out): its fold-A
    figure is the fold that chose it, in status and in the pipeline's summary alike."""
    from vspw_ray.pipeline.plan import Step
    from vspw_ray.pipeline.run import PipelineResult, format_summary
    from vspw_ray.pipeline.status import StepStatus
    from vspw_ray.stages.records import headline

    crossfit = {"final/val_A/miou": 0.0292, "final/val_B/miou": 0.4133,
                "oof/ensemble/miou": 0.2172}
    assert headline("ensemble", crossfit) == ("oof/ensemble/miou", 0.2172)
    holdout = {"final/val_A/miou": 0.45, "final/val_B/miou": 0.40}
    assert headline("ensemble", holdout) == ("final/val_B/miou", 0.40)
    assert headline("ensemble", {"final/val_A/miou": 0.45}) is None
    assert headline("train", crossfit) == ("final/val_A/miou", 0.0292)
    row = StepStatus("ensemble:all", "done", "", "oof/ensemble/miou", 0.2172, None, None, None)
    assert "out-of-fold 21.72" in format_status([row])
    steps = [Step("train", "a", "k1", (), True, ""), Step("train", "b", "k2", (), True, ""),
             Step("ensemble", "all", "k3", (), True, "")]
    result = PipelineResult(steps, ran=[s.id for s in steps], headline={
        "train:a": headline("train", {"final/val_A/miou": 0.30}),
        "train:b": headline("train", {"final/val_A/miou": 0.35}),
        "ensemble:all": headline("ensemble", crossfit)})
    rows = {line.split()[0]: line for line in format_summary(result).splitlines()[1:]}
    assert list(rows) == ["train", "ensemble"]
    assert rows["train"].endswith("best val_A mIoU 35.00")
    assert rows["ensemble"].endswith("  out-of-fold mIoU 21.72")
