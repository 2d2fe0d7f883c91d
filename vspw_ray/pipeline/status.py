"""`vspw-ray status EXP`: where an experiment's pipeline stands, from storage alone (its plan,
completion records and running markers; no Ray, no MLflow): one row per step, done / running /
stale / missing, with its headline figure and measured cost."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from vspw_ray.config import ExperimentConfig
from vspw_ray.layout import RunLayout
from vspw_ray.pipeline.plan import Step, build_plan
from vspw_ray.stages import search
from vspw_ray.stages.records import HEADLINE_LABELS, headline, read_marker, read_record
from vspw_ray.storage import resolve_storage

__all__ = ["StepStatus", "experiment_status", "format_status", "STATES"]

STATES = ("done", "running", "stale", "missing")


@dataclass(frozen=True)
class StepStatus:
    step: str  # stage:item
    state: str  # one of STATES
    detail: str  # when it finished, who runs it, or what changed
    headline: str | None  # the figure's name
    value: float | None
    gpu_hours: float | None  # measured (cost/gpu_hours of the step's run)
    cpu_hours: float | None
    wall_s: float | None


def _status(layout: RunLayout, pipeline: str, step: Step) -> StepStatus:
    record = read_record(layout, pipeline, step.id)
    marker = read_marker(layout, pipeline, step.id)
    outputs = (record or {}).get("outputs", {})
    figure = headline(step.stage, outputs)
    if record is not None and record.get("key") == step.key:
        state = "done"
        detail = "finished " + time.strftime("%Y-%m-%d %H:%M", time.localtime(
            float(record.get("finished_at", 0))))
    elif marker is not None and marker["live"] and marker.get("key") == step.key:
        state = "running"
        detail = (f"on {marker.get('host')} (pid {marker.get('pid')}) for "
                  f"{(time.time() - float(marker['started_at'])) / 60:.0f} min")
    elif record is not None:
        state, detail = "stale", f"settings or data changed (key {record.get('key')} -> {step.key})"
    else:
        state = "missing"
        detail = "not run yet" if marker is None else (
            "its last run stopped " + time.strftime("%Y-%m-%d %H:%M", time.localtime(
                float(marker.get("heartbeat", 0)))))
    return StepStatus(step.id, state, detail, figure[0] if figure else None,
                      figure[1] if figure else None,
                      outputs.get("cost/gpu_hours"), outputs.get("cost/cpu_hours"),
                      outputs.get("cost/wall_s"))


def experiment_status(cfg: ExperimentConfig) -> list[StepStatus]:
    """Every step of ``cfg``'s pipeline with its state (after a finished search: the steps of
    the configurations it chose)."""
    layout = RunLayout(resolve_storage(cfg.storage.path))
    steps = build_plan(cfg, layout)
    rows = [_status(layout, cfg.name, s) for s in steps]
    sweep = next((s for s in steps if s.stage == search.NAME), None)
    record = search.done(layout, cfg.name, "all", sweep.key) if sweep else None
    if record is not None:
        steps = build_plan(cfg, layout, search.chosen_variants(cfg, record))
        rows += [_status(layout, cfg.name, s) for s in steps if s.stage not in ("data", "search")]
    return rows


def format_status(rows: list[StepStatus]) -> str:
    lines = [f"{'step':<34} {'state':<8} {'headline':>17} {'GPU-h':>7} {'CPU-h':>7} "
             f"{'wall':>8}  detail"]
    for r in rows:
        figure = "-" if r.value is None else f"{HEADLINE_LABELS[r.headline]} {100 * r.value:.2f}"
        gpu = f"{r.gpu_hours:7.2f}" if r.gpu_hours is not None else f"{'-':>7}"
        cpu = f"{r.cpu_hours:7.3f}" if r.cpu_hours is not None else f"{'-':>7}"
        wall = f"{r.wall_s:7.0f}s" if r.wall_s is not None else f"{'-':>8}"
        lines.append(f"{r.step:<34} {r.state:<8} {figure:>17} {gpu} {cpu} {wall}  {r.detail}")
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" of {len(rows)} steps")
    return "\n".join(lines)


def status_json(rows: list[StepStatus]) -> list[dict]:
    return [asdict(r) for r in rows]
