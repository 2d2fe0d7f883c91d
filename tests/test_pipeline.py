"""`vspw-ray pipeline`: the plan from config and storage alone, skipping by stage keys, the
paper-scale plan, and a tiny pipeline end to end (submission, MLflow keys, "nothing to do")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vspw_ray.config import load_config
from vspw_ray.layout import RunLayout
from vspw_ray.pipeline.plan import build_plan
from vspw_ray.pipeline.records import write_record

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"


def _complete(cfg, layout):
    """Mark every step of ``cfg``'s plan done, as a finished pipeline leaves it."""
    for step in build_plan(cfg, layout):
        write_record(layout, cfg.name, step.id, step.key)


@pytest.mark.parametrize("change, reruns", [
    ([], set()),
    (["swa.every=5"], {"swa", "infer", "ensemble"}),
    (["infer.scales=[1.0]"], {"infer", "ensemble"}),
    (["ensemble.weight_range=[0.0,3.0]"], {"ensemble"}),
    (["train.lr=0.001"], {"train", "swa", "infer", "ensemble"}),
])
def test_a_changed_setting_reruns_exactly_its_stage_and_later_ones(tmp_path, change, reruns):
    layout = RunLayout(str(tmp_path / "runs"))
    cfg = load_config(QUICKSTART, [f"storage.path={tmp_path / 'runs'}"])
    _complete(cfg, layout)
    changed = build_plan(load_config(QUICKSTART, [f"storage.path={tmp_path / 'runs'}", *change]),
                         layout)
    assert {s.stage for s in changed if s.run} == reruns
    if reruns:  # every step of a re-run stage runs, for every variant
        assert all(s.run for s in changed if s.stage in reruns)
        assert any("settings changed" in s.reason for s in changed if s.run)


def test_a_variant_override_reruns_only_that_variant(tmp_path):
    layout = RunLayout(str(tmp_path / "runs"))
    cfg = load_config(QUICKSTART, [f"storage.path={tmp_path / 'runs'}"])
    _complete(cfg, layout)
    text = QUICKSTART.read_text().replace("    data.crop_size: [64, 64]\n",
                                          "    data.crop_size: [64, 96]\n")
    path = tmp_path / "quickstart.yaml"
    path.write_text(text)
    plan = build_plan(load_config(path, [f"storage.path={tmp_path / 'runs'}"]), layout)
    ran = {s.id for s in plan if s.run}
    assert ran == {"train:upernet_crop64", "swa:upernet_crop64", "infer:upernet_crop64/val",
                   "infer:upernet_crop64/test", "ensemble:all"}


def test_seed_recipe_plan_has_22_variants_in_stage_order(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vspw_ray", "pipeline",
                          str(REPO / "experiments" / "vspw_seed.yaml"), "--dry-run",
                          f"storage.path={tmp_path / 'runs'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if ":" in line.split(" ")[0]]
    steps = [r[0] for r in rows]
    trains = [s for s in steps if s.startswith("train:")]
    assert len(trains) == 22
    assert sum(s.startswith("train:up_") for s in trains) == 11
    assert sum(s.startswith("train:mf_") for s in trains) == 11
    assert steps[0] == "data:all" and steps[-1] == "ensemble:all"
    for name in (t.split(":", 1)[1] for t in trains):  # each variant: train, swa, infer in order
        order = [steps.index(f"{stage}:{name}") for stage in ("train", "swa")]
        order += [steps.index(f"infer:{name}/{split}") for split in ("val", "test")]
        assert order == sorted(order)
    assert all(r[1] == "run" for r in rows)
    train_rows = [line for line in out.stdout.splitlines() if line.startswith("train:")]
    assert all("8 worker(s) x {CPU 1, GPU 1}" in line for line in train_rows)
    assert "GPU-hours" in out.stdout.splitlines()[-1]
    assert not (tmp_path / "runs" / "pipeline").exists()  # a dry run writes nothing
