"""`vspw-ray pipeline`: the plan from config and storage alone, skipping by stage keys, the
paper-scale plan, teachers before students, and a killed pipeline resumed. The end-to-end run
(MLflow keys, a student after its teacher, "nothing to do") is the CamVid smoke run's, in
tests/test_reproduce.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vspw_ray.config import load_config
from vspw_ray.layout import RunLayout
from vspw_ray.pipeline.plan import build_plan
from vspw_ray.stages.records import write_record

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"


def _load(path: Path, tmp_path: Path, root: Path, *overrides: str):
    """An experiment with its storage under ``tmp_path`` and its data at ``root``."""
    return load_config(path, [f"storage.path={tmp_path / 'runs'}", f"data.root={root}",
                              *overrides])


def _complete(cfg, layout):
    """Mark every step of ``cfg``'s plan done, as a finished pipeline leaves it."""
    for step in build_plan(cfg, layout):
        write_record(layout, cfg.name, step.id, step.key)


# the quickstart's distilled student learns from a teacher's SWA average: a new SWA setting
# also re-trains the student (and only the student)
STUDENT_TRAIN = {"train:upernet_crop96_distill"}


@pytest.mark.parametrize("change, reruns, also", [
    ([], set(), set()),
    (["swa.every=5"], {"swa", "infer", "ensemble"}, STUDENT_TRAIN),
    (["infer.scales=[1.0]"], {"infer", "ensemble"}, set()),
    (["ensemble.weight_range=[0.0,3.0]"], {"ensemble"}, set()),
    (["train.lr=0.001"], {"train", "swa", "infer", "ensemble"}, set()),
])
def test_a_changed_setting_reruns_exactly_its_stage_and_later_ones(tmp_path, synth_root,
                                                                   change, reruns, also):
    layout = RunLayout(str(tmp_path / "runs"))
    cfg = _load(QUICKSTART, tmp_path, synth_root)
    _complete(cfg, layout)
    changed = build_plan(_load(QUICKSTART, tmp_path, synth_root, *change), layout)
    assert {s.id for s in changed if s.run and s.stage not in reruns} == also
    if reruns:  # every step of a re-run stage runs, for every variant
        assert all(s.run for s in changed if s.stage in reruns)
        assert any("settings changed" in s.reason for s in changed if s.run)


def test_data_and_search_settings_rerun_their_steps(tmp_path, synth_root):
    """The data step is keyed by the splits the pipeline reads, the search step by the sweep's
    settings: changing either re-runs that step; a setting neither covers changes nothing.
    Steps after a re-run data step run again too, under their old keys where their own data
    is the same (val's members here), so they find their results instead of recomputing."""
    layout = RunLayout(str(tmp_path / "runs"))
    cfg = _load(QUICKSTART, tmp_path, synth_root)
    _complete(cfg, layout)
    before = {s.id: s.key for s in build_plan(cfg, layout)}
    fewer = build_plan(_load(QUICKSTART, tmp_path, synth_root, "pipeline.splits=[val]"), layout)
    assert fewer[0].id == "data:all" and "settings changed" in fewer[0].reason
    later = [s for s in fewer[1:] if s.stage != "ensemble"]  # the ensemble applies no test now
    assert later and all(s.run and s.reason.startswith("after ") for s in later)
    assert {s.id: s.key for s in later} == {s.id: before[s.id] for s in later}
    assert not any(s.id.endswith("/test") for s in fewer)
    searched = _load(QUICKSTART, tmp_path, synth_root, "pipeline.search=true")
    _complete(searched, layout)
    assert not [s.id for s in build_plan(searched, layout) if s.run]
    for change in ("tune.num_samples=5", "tune.iters=30"):
        steps = build_plan(_load(QUICKSTART, tmp_path, synth_root, "pipeline.search=true",
                                 change), layout)
        assert [s.id for s in steps if s.run] == ["search:all"], change
    same = build_plan(_load(QUICKSTART, tmp_path, synth_root, "pipeline.search=true",
                            "infer.scales=[1.0]"), layout)
    assert not [s.id for s in same if s.run]  # inference comes after the sweep


def test_a_variant_override_reruns_only_that_variant(tmp_path, synth_root):
    layout = RunLayout(str(tmp_path / "runs"))
    cfg = _load(QUICKSTART, tmp_path, synth_root)
    _complete(cfg, layout)
    text = QUICKSTART.read_text().replace("overrides: {data.crop_size: [64, 64]}",
                                          "overrides: {data.crop_size: [64, 96]}")
    assert text != QUICKSTART.read_text()
    path = tmp_path / "quickstart.yaml"
    path.write_text(text)
    plan = build_plan(_load(path, tmp_path, synth_root), layout)
    ran = {s.id for s in plan if s.run}
    assert ran == {"train:upernet_crop64", "swa:upernet_crop64", "infer:upernet_crop64/val",
                   "infer:upernet_crop64/test", "ensemble:all"}


STUDENT_FIRST = """variants:
- name: student
  seed: 1
  overrides:
    data.crop_size: [64, 64]
    loss.distill.enabled: true
    loss.distill.teacher: variant:teacher
- name: teacher
  seed: 0
  overrides:
    data.crop_size: [64, 64]
"""


def _with_variants(tmp_path: Path, variants: str, name: str = "distill.yaml") -> Path:
    text = QUICKSTART.read_text()
    path = tmp_path / name
    path.write_text(text[:text.index("variants:\n")] + variants)
    return path


def test_a_student_waits_for_its_teacher_variant_and_follows_its_changes(tmp_path, synth_root):
    from vspw_ray.config import resolve_variant, settings_id

    runs = f"storage.path={tmp_path / 'runs'}"
    data = f"data.root={synth_root}"
    layout = RunLayout(str(tmp_path / "runs"))
    exp = _with_variants(tmp_path, STUDENT_FIRST)
    cfg = load_config(exp, [runs, data])
    plan = build_plan(cfg, layout)
    ids = [s.id for s in plan]
    assert ids.index("swa:teacher") < ids.index("train:student")  # teachers first
    student_train = next(s for s in plan if s.id == "train:student")
    assert student_train.needs == ("data:all", "swa:teacher")  # its SWA average, pipeline.swa
    teacher = resolve_variant(cfg, "teacher")
    pinned = resolve_variant(cfg, "student").loss.distill.teacher
    assert pinned.startswith(f"variant:teacher@{settings_id(teacher)}+swa-")
    _complete(cfg, layout)
    # the teacher's training changes: both chains re-run; its SWA changes: the student too
    for change in (["train.lr=0.001"], ["swa.every=5"]):
        changed = build_plan(load_config(exp, [runs, data, *change]), layout)
        assert {s.id for s in changed if s.run} >= {"train:student", "swa:student"}
    # only the student's own setting changes: the teacher stays done
    text = exp.read_text().replace("    loss.distill.enabled: true\n",
                                   "    loss.distill.enabled: true\n    loss.distill.weight: 0.5\n")
    exp.write_text(text)
    ran = {s.id for s in build_plan(load_config(exp, [runs, data]), layout) if s.run}
    assert not any(step.endswith(":teacher") or ":teacher/" in step for step in ran)
    assert "train:student" in ran
    # without pipeline.swa the student learns from the teacher's training checkpoint
    plain = build_plan(load_config(exp, [runs, data, "pipeline.swa=false"]), layout)
    assert next(s for s in plain if s.id == "train:student").needs == ("data:all",
                                                                       "train:teacher")


def test_a_student_chain_trains_from_its_teachers_swa_average_once_it_is_made(tmp_path,
                                                                             synth_root,
                                                                             monkeypatch):
    """The pipeline's variant chains in flight together: the student waits for its teacher's
    SWA average and trains with it bound as ``loss.distill.teacher_checkpoint``. The stage
    functions are stand-ins (no Ray) that write real checkpoint folders where the stages do, so
    the binding is looked up in storage as in a real run."""
    import threading
    from types import SimpleNamespace

    import vspw_ray.infer.job as job
    import vspw_ray.train.driver as driver
    import vspw_ray.train.swa as swa
    from vspw_ray import stages
    from vspw_ray.checkpoints import write_checkpoint
    from vspw_ray.config import to_dict, variant_id
    from vspw_ray.ids import swa_variant_id
    from vspw_ray.pipeline.run import PipelineResult, _execute

    cfg = _load(_with_variants(tmp_path, STUDENT_FIRST), tmp_path, synth_root,
                "pipeline.max_concurrent=2", "pipeline.splits=[val]")
    layout = RunLayout(str(tmp_path / "runs"))
    events, lock = [], threading.Lock()

    def record(event):
        with lock:
            events.append(event)

    def checkpoint(folder, c, **state):
        write_checkpoint(folder, {"config": to_dict(c), "metrics": {"val_A/miou": 0.5}, **state})
        return folder

    def train(c, variant, **_):
        vid = variant_id(c)
        record(("train", c.seed, c.loss.distill.teacher_checkpoint))
        folder = checkpoint(f"{layout.train_run(vid)}/checkpoint_000000", c, variant_id=vid,
                            iteration=8)
        return driver.TrainResult(vid, {}, folder, folder, None)

    def average(c, variant, *, from_checkpoint, **_):
        vid = swa_variant_id(variant_id(c), c.swa, 8)
        folder = checkpoint(f"{layout.swa_run(vid)}/checkpoint_000000", c, variant_id=vid,
                            iteration=8, kind="swa_average")
        record(("swa", c.seed, folder))
        return swa.SwaResult(vid, variant_id(c), folder, folder, {}, None)

    monkeypatch.setattr(driver, "train_variant", train)
    monkeypatch.setattr(swa, "swa_variant", average)
    monkeypatch.setattr(job, "run_inference", lambda c, ckpt, split, **k: _inferred(
        job, "m", "v", split, {}))
    monkeypatch.setattr(stages.data, "run", lambda ctx, item: stages.data.Record())
    monkeypatch.setattr(stages.ensemble, "run", lambda ctx, item: stages.ensemble.Record())
    stage = SimpleNamespace(layout=layout, run_id=None, address=None)
    _execute(cfg, stage, PipelineResult(build_plan(cfg, layout)), 1)
    teacher_swa = next(i for i, e in enumerate(events) if e[:2] == ("swa", 0))
    student_train = next(i for i, e in enumerate(events) if e[:2] == ("train", 1))
    assert teacher_swa < student_train  # seed 0 is the teacher, seed 1 the student
    assert events[student_train][2] == f"{events[teacher_swa][2]}/checkpoint.pt"


def _inferred(job, key: str, vid: str, split: str, metrics: dict):
    """A stand-in inference's result: nothing written, ``metrics`` as measured."""
    return job.InferResult(key, vid, split, "store", "predictions", 0, [], 0.0, 0.0, 0, metrics,
                           None)


@pytest.mark.parametrize("variants, message", [
    (STUDENT_FIRST.replace("variant:teacher", "variant:nobody"), "names no variant"),
    (STUDENT_FIRST.replace("variant:teacher", "variant:student"), "circle"),
    (STUDENT_FIRST + "    model.channels: 32\n", "model keys ['channels'] differ"),
])
def test_a_bad_teacher_variant_is_refused_naming_the_key(tmp_path, synth_root, variants,
                                                        message):
    from vspw_ray.config import ConfigError

    cfg = load_config(_with_variants(tmp_path, variants), [f"data.root={synth_root}"])
    with pytest.raises(ConfigError, match="loss.distill.teacher") as err:
        build_plan(cfg, RunLayout(str(tmp_path / "runs")))
    assert message in str(err.value)


def test_a_student_trained_alone_before_its_teacher_names_the_command(tmp_path, synth_root):
    from vspw_ray.config import ConfigError
    from vspw_ray.train.driver import train_variant

    cfg = load_config(_with_variants(tmp_path, STUDENT_FIRST), [f"storage.path={tmp_path}",
                                                                 f"data.root={synth_root}"])
    with pytest.raises(ConfigError, match="teacher variant 'teacher' has no complete training "
                                          "checkpoint") as err:
        train_variant(cfg, "student", track=False)
    assert "vspw-ray train" in str(err.value) and "--variant teacher" in str(err.value)


def test_seed_recipe_plan_has_22_variants_in_stage_order(tmp_path, synth_copy):
    train = (synth_copy / "train.txt").read_text().split()  # the seed's halves of train
    (synth_copy / "train_a.txt").write_text("\n".join(train[: len(train) // 2]))
    (synth_copy / "train_b.txt").write_text("\n".join(train[len(train) // 2:]))
    out = subprocess.run([sys.executable, "-m", "vspw_ray", "pipeline",
                          str(REPO / "experiments" / "vspw_seed.yaml"), "--dry-run",
                          f"storage.path={tmp_path / 'runs'}", f"data.root={synth_copy}"],
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


def _tiny_experiment(tmp_path: Path, *, variants: str, splits: str, swa: str) -> Path:
    """The quickstart cut down to seconds: few iterations, one TTA scale, a coarse grid."""
    import yaml

    from vspw_ray.config import apply_overrides, load_yaml

    sets = {"train.iters": 8, "train.val_interval": 8, "train.warmup_iters": 1,
            "train.log_interval": 4, "data.loader_workers": 0, "infer.scales": [1.0],
            "ensemble.method": "grid", "ensemble.grid_step": 0.5,
            "pipeline.splits": load_yaml(splits),
            **{f"swa.{k}": v for k, v in load_yaml("{" + swa + "}").items()}}
    data = apply_overrides(load_yaml(QUICKSTART.read_text()), sets)
    data["variants"] = load_yaml(variants)["variants"]
    text = yaml.safe_dump(data, sort_keys=False)
    path = tmp_path / "tiny_pipeline.yaml"
    path.write_text(text)
    return path


ONE_VARIANT = """variants:
- name: upernet_crop64
  seed: 0
  overrides:
    data.crop_size: [64, 64]
"""


@pytest.mark.slow(80)
def test_pipeline_killed_after_an_swa_snapshot_resumes_without_retraining(synth_root, tmp_path):
    from tests.test_train_ray import wait_for_registered
    from vspw_ray.checkpoints import list_checkpoints, read_state

    exp = _tiny_experiment(tmp_path, variants=ONE_VARIANT, splits="[val]",
                           swa="extra_iters: 40, every: 10")
    storage = tmp_path / "runs"
    cmd = [sys.executable, "-m", "vspw_ray", "pipeline", str(exp), "--no-track",
           f"data.root={synth_root}", f"storage.path={storage}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
        try:  # the first SWA snapshot registered: training is done and recorded
            wait_for_registered(storage, lambda: proc.poll() is None, "the kill",
                                timeout_s=400, stage="swa")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    plan = {line.split()[0]: line.split()[1] for line in rerun.stdout.splitlines()
            if line.startswith(("train:", "swa:", "infer:"))}
    assert plan["train:upernet_crop64"] == "skip"  # training is not redone
    assert plan["swa:upernet_crop64"] == "run"
    assert "it 4/8" not in rerun.stdout + rerun.stderr  # no training iteration ran again
    swa_runs = [p for p in (storage / "swa").iterdir() if p.is_dir()]
    average = [f for f, s in list_checkpoints(str(swa_runs[0])) if s["kind"] == "swa_average"]
    state = read_state(f"{average[0]}/checkpoint.pt")
    assert state["resumes"] and state["resumes"][0] >= 10  # SWA resumed from its snapshot
    assert len(list((storage / "scores").glob("*/val/*.parquet"))) > 0


def test_a_failing_step_names_stage_variant_and_the_command_to_rerun(tmp_path, synth_root):
    from types import SimpleNamespace

    from vspw_ray.pipeline.plan import Step
    from vspw_ray.pipeline.run import PipelineResult
    from vspw_ray.pipeline.steps import Context, StageFailed
    from vspw_ray.stages import swa
    from vspw_ray.stages.records import read_record

    cfg = _load(QUICKSTART, tmp_path, synth_root)
    layout = RunLayout(str(tmp_path / "runs"))
    step = Step("swa", "upernet_crop64", "k1", ("train:upernet_crop64",), True, "not done yet")
    ctx = Context(cfg, SimpleNamespace(layout=layout, run_id=None, address=None), 1,
                  PipelineResult([step]))

    def broken(ctx, item):
        raise FileNotFoundError("no complete training checkpoint under .../train/up-1")

    with pytest.raises(StageFailed, match=r"swa:upernet_crop64 failed \(swa of upernet_crop64\)"
                                          r".*no complete training checkpoint.*re-run the same"):
        ctx.run(step, broken)
    assert read_record(layout, cfg.name, step.id) is None  # a failed step is not recorded
    made = swa.Record(checkpoint="x", figures={"final/val_A/miou": 0.5})
    assert ctx.run(step, lambda ctx, item: made) == made
    stored = read_record(layout, cfg.name, step.id)
    assert stored["key"] == "k1" and swa.Record.from_outputs(stored["outputs"]) == made
    assert swa.done(layout, cfg.name, step.item, "k1") == made
    assert swa.done(layout, cfg.name, step.item, "another key") is None
    assert ctx.result.ran == [step.id]
    assert ctx.result.headline[step.id] == ("final/val_A/miou", 0.5)


def test_only_the_val_split_fills_the_common_final_keys(tmp_path, synth_root, monkeypatch):
    """A test split's inference figures are folds of *test*: they must not be recorded (or
    logged to MLflow) as final/val_A/... beside the val members."""

    import vspw_ray.infer.job as job
    from vspw_ray.stages import StageContext, infer, variants_of

    cfg = _load(QUICKSTART, tmp_path, synth_root)
    figures = {"val_A/miou": 0.3, "val_B/miou": 0.4}
    monkeypatch.setattr(job, "run_inference", lambda c, ckpt, split, **k: _inferred(
        job, "m", "v", split, figures))
    v = variants_of(cfg)[0]
    ctx = StageContext(cfg, variants=(v,))
    val, test = (infer.run(ctx, infer.item_of(v.name, split)) for split in ("val", "test"))
    assert val.figures == {"final/val_A/miou": 0.3, "final/val_B/miou": 0.4}
    assert val.metrics == figures and test.metrics == figures  # under the split's own keys
    assert test.figures == {}


TWO_VARIANTS = """variants:
- name: small
  seed: 0
  overrides:
    data.crop_size: [64, 64]
- name: large
  seed: 1
"""


def test_other_data_reruns_every_step_under_new_ids_then_nothing_to_do(tmp_path, synth_root,
                                                                        monkeypatch, capsys):
    """The pipeline's own orchestration (plan, the real data step, records) with stand-in stages
    that return the ids the stages compute: a set of the same shape drawn with another seed
    re-runs every step under new ids, and a re-run then has nothing to do; the first set copied
    to another path is the same data (nothing to do, the same ids)."""
    import shutil
    from types import SimpleNamespace

    import vspw_ray.infer.job as job
    import vspw_ray.train.driver as driver
    import vspw_ray.train.swa as swa
    from vspw_ray import stages
    from vspw_ray.config import variant_id
    from vspw_ray.data.fingerprint import data_fingerprint, split_fingerprint
    from vspw_ray.data.synth import SynthSpec, synthesize
    from vspw_ray.ids import member_key, swa_variant_id
    from vspw_ray.pipeline.run import PipelineResult, _execute, run_pipeline
    from vspw_ray.pipeline.steps import members_rows

    other, moved = tmp_path / "other", tmp_path / "moved"
    synthesize(other, SynthSpec(videos=8, frames=12, classes=6, height=64, width=80, seed=4),
               processes=1)
    shutil.copytree(synth_root, moved)
    ids: list[str] = []
    monkeypatch.setattr(driver, "train_variant", lambda c, v, **_: driver.TrainResult(
        ids.append(variant_id(c)) or ids[-1], {}, "b", "b", None))
    monkeypatch.setattr(swa, "swa_variant", lambda c, v, **_: swa.SwaResult(
        swa_variant_id(variant_id(c), c.swa, 8), variant_id(c), "b", "s", {}, None))
    monkeypatch.setattr(job, "run_inference", lambda c, ckpt, split, **_: _inferred(
        job, member_key(variant_id(c), 8, c.infer, split_fingerprint(c.data.root, split)),
        variant_id(c), split, {}))
    monkeypatch.setattr(stages.ensemble, "run", lambda ctx, item: stages.ensemble.Record())
    exp = _with_variants(tmp_path, TWO_VARIANTS)
    layout = RunLayout(str(tmp_path / "runs"))

    def pipeline(root: Path) -> tuple[list, PipelineResult]:
        cfg = _load(exp, tmp_path, root, "pipeline.max_concurrent=1", "pipeline.splits=[val]")
        plan = build_plan(cfg, layout)
        result = PipelineResult(plan)
        if any(s.run for s in plan):
            _execute(cfg, SimpleNamespace(layout=layout, run_id=None, address=None), result, 1)
        again = run_pipeline(cfg, track=False)
        assert again.nothing_to_do and "nothing to do" in capsys.readouterr().out
        return plan, result

    plan_a, first = pipeline(synth_root)
    assert set(first.ran) == {s.id for s in plan_a} and len(ids) == 2
    old = {s.id: s.key for s in plan_a}
    plan_moved, moved_run = pipeline(moved)  # the first set at another path: the same keys
    assert moved_run.ran == [] and {s.id: s.key for s in plan_moved} == old and len(ids) == 2
    plan_b, second = pipeline(other)
    assert set(second.ran) == {s.id for s in plan_b}  # every step, the data step too
    assert all("settings changed" in s.reason for s in plan_b)
    assert not set(ids[:2]) & set(ids[2:])  # new variant ids
    new = {s.id: s.key for s in plan_b}
    assert all(old[k] != new[k] for k in old)  # every later step under a new key
    second.steps = plan_b  # members.csv: each step's data (a variant's, a split's)
    rows = {r["step"]: r["data_fingerprint"] for r in members_rows(second)}
    assert rows["train:small"] == rows["swa:large"] == data_fingerprint(other, ("train", "val"))
    assert rows["infer:small/val"] == split_fingerprint(str(other), "val")
