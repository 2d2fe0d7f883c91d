"""The stage contract (vspw_ray.stages): every stage's record read back from storage as it was
written, and the pipeline's step scheduler: a step starts only after the steps it needs, a
variant's chain goes on before the next variant starts, and a failure stops new steps while the
steps in flight finish and are recorded."""

from __future__ import annotations

import threading
from dataclasses import fields
from types import SimpleNamespace

import pytest

from vspw_ray.layout import RunLayout
from vspw_ray.pipeline.plan import Step
from vspw_ray.pipeline.run import PipelineResult, _run_graph
from vspw_ray.pipeline.steps import Context, StageFailed
from vspw_ray.stages import STAGES, StageRecord
from vspw_ray.stages.records import read_record, write_record


def _filled(record_type: type[StageRecord]) -> StageRecord:
    """A record with every field away from its default, of the field's own type."""
    values = {}
    for f in fields(record_type):
        kind = str(f.type)
        if f.name == "figures":
            values[f.name] = {"final/val_A/miou": 0.25, "cost/gpu_hours": 1.5}
        elif kind.startswith("tuple"):
            values[f.name] = ("a", "b")
        elif kind.startswith("dict"):
            values[f.name] = {"x": 1.0}
        elif kind.startswith("int"):
            values[f.name] = 7
        elif kind.startswith("float"):
            values[f.name] = 2.5
        else:
            values[f.name] = f"{f.name}-value"
    return record_type(**values)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_reads_back_the_record_it_wrote_under_its_key_only(tmp_path, name):
    stage = STAGES[name]
    layout = RunLayout(str(tmp_path))
    record = _filled(stage.Record)
    assert record != stage.Record()  # every field differs from its default
    write_record(layout, "exp", f"{name}:item", "key-1", record.outputs())
    assert stage.done(layout, "exp", "item", "key-1") == record
    assert stage.done(layout, "exp", "item", "key-2") is None  # other settings or data
    assert stage.done(layout, "exp", "other", "key-1") is None  # never completed
    if record.figures:
        assert record.headline == ("final/val_A/miou", 0.25) or name == "ensemble"


def test_a_record_written_by_an_older_version_reads_with_defaults(tmp_path):
    """A stored record lacking a field this version added takes the field's default; a key no
    field names (a field since removed) is ignored; figures stay figures."""
    from vspw_ray.stages import train

    layout = RunLayout(str(tmp_path))
    write_record(layout, "exp", "train:a", "k", {"variant_id": "v1", "checkpoint": "c",
                                                 "run_id": "r", "removed_field": [1, 2],
                                                 "final/val_A/miou": 0.5})
    got = train.done(layout, "exp", "a", "k")
    assert got == train.Record(variant_id="v1", checkpoint="c", run_id="r",
                               figures={"final/val_A/miou": 0.5})
    assert got.latest_checkpoint is None and got.metrics == {}


def _chain(name: str, *, teacher: str | None = None) -> list[Step]:
    """train -> swa -> infer of one variant, as the plan lays them out."""
    train_needs = ("data:all",) + ((f"swa:{teacher}",) if teacher else ())
    return [Step("train", name, f"t-{name}", train_needs, True, ""),
            Step("swa", name, f"s-{name}", (f"train:{name}",), True, ""),
            Step("infer", f"{name}/val", f"i-{name}", (f"swa:{name}",), True, "")]


def _graph(tmp_path, monkeypatch, steps: list[Step], work):
    """Run ``steps`` through the scheduler with each stage's ``run`` replaced by ``work``."""
    from vspw_ray.config import load_config

    for stage in STAGES.values():
        monkeypatch.setattr(stage, "run", lambda ctx, item, stage=stage: work(stage, item))
    cfg = load_config("experiments/quickstart.yaml", [f"storage.path={tmp_path}"])
    layout = RunLayout(str(tmp_path))
    plan = [Step("data", "all", "d", (), False, "done")] + steps
    result = PipelineResult(plan)
    ctx = Context(cfg, SimpleNamespace(layout=layout, run_id=None, address=None), 1, result)
    return ctx, layout, result


def test_one_worker_finishes_a_variant_before_the_next_and_students_after_teachers(
        tmp_path, monkeypatch):
    order: list[str] = []

    def work(stage, item):
        order.append(f"{stage.NAME}:{item}")
        return stage.Record()

    plan = _chain("student", teacher="teacher") + _chain("teacher") + _chain("other")
    ctx, _, _ = _graph(tmp_path, monkeypatch, plan, work)
    _run_graph(ctx, plan, workers=1)
    assert order == ["train:teacher", "swa:teacher", "train:student", "swa:student",
                     "infer:student/val", "infer:teacher/val", "train:other", "swa:other",
                     "infer:other/val"]


def test_a_failure_starts_nothing_after_it(tmp_path, monkeypatch):
    """One worker: ``a``'s training fails, so nothing more starts -- neither ``a``'s later
    steps nor ``b``'s chain -- and the failure raised names ``train:a``."""
    order = []

    def work(stage, item):
        order.append(f"{stage.NAME}:{item}")
        if item == "a":
            raise RuntimeError("out of memory")
        return stage.Record()

    plan = _chain("a") + _chain("b")
    ctx, layout, result = _graph(tmp_path, monkeypatch, plan, work)
    with pytest.raises(StageFailed, match=r"train:a failed .*out of memory"):
        _run_graph(ctx, plan, workers=1)
    assert order == ["train:a"] and result.ran == []
    assert read_record(layout, "quickstart", "train:a") is None


def test_a_step_in_flight_when_another_fails_finishes_and_is_recorded(tmp_path, monkeypatch):
    """Two workers: ``a``'s training fails while ``b``'s runs; ``b``'s training still finishes
    (after the failure) and is recorded, nothing after ``a``'s training starts, and the failure
    raised names ``train:a``."""
    b_started, a_failing, order = threading.Event(), threading.Event(), []

    def work(stage, item):
        order.append(f"{stage.NAME}:{item}")
        if item == "b":
            b_started.set()
            assert a_failing.wait(60)
            return stage.Record(run_id="b-run")
        if item != "a":  # a later step of b's chain (it may start before the failure is seen)
            return stage.Record()
        assert b_started.wait(60)  # b is in flight when a fails
        a_failing.set()
        raise RuntimeError("out of memory")

    plan = _chain("a") + _chain("b")
    ctx, layout, result = _graph(tmp_path, monkeypatch, plan, work)
    with pytest.raises(StageFailed, match=r"train:a failed .*out of memory"):
        _run_graph(ctx, plan, workers=2)
    assert order[:2] in (["train:a", "train:b"], ["train:b", "train:a"])
    assert not [s for s in order if s.split(":")[1].split("/")[0] == "a" and s != "train:a"]
    assert "train:b" in result.ran and "train:a" not in result.ran
    assert read_record(layout, "quickstart", "train:b")["outputs"]["run_id"] == "b-run"
    assert read_record(layout, "quickstart", "train:a") is None
