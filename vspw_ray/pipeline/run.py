"""`vspw-ray pipeline`: data check and stats -> search (optional) -> train -> SWA -> TTA
inference on val and test -> ensemble -> submission, each step skipped when its completion
record holds the same key. Each step is its stage's ``run`` (:mod:`vspw_ray.stages`; each
resumable by itself), started once the steps it needs are done, so a pipeline killed anywhere
and re-run continues where it stopped.

MLflow: one parent run per pipeline invocation; every stage's run is its child (each stage's
context carries its id, ``parent_run``: :meth:`vspw_ray.pipeline.steps.Context.stage_context`), and
every member run carries the same final keys (``final/val_A/miou``, ..., params ``family``,
``crop``, ``ohem``, ``tau``, ``distill``, ``swa``, ``tta``) for ``mlflow.search_runs``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from vspw_ray.config import ExperimentConfig
from vspw_ray.cost import Held, log_cost, sum_child_costs
from vspw_ray.layout import RunLayout
from vspw_ray.pipeline.plan import Step, build_plan, format_plan
from vspw_ray.pipeline.steps import Context, StageFailed
from vspw_ray.runtime import open_stage
from vspw_ray.stages import StageRecord, Variant, data, search, variants_of
from vspw_ray.stages.records import HEADLINE_LABELS
from vspw_ray.storage import check_cluster_settings, resolve_storage

__all__ = ["PipelineResult", "StageFailed", "run_pipeline", "plan_pipeline", "format_summary"]

log = logging.getLogger("vspw_ray.pipeline")


@dataclass
class PipelineResult:
    steps: list[Step]
    ran: list[str] = field(default_factory=list)  # step ids run by this invocation
    times: dict[str, float] = field(default_factory=dict)  # step id -> seconds
    headline: dict[str, tuple[str, float] | None] = field(default_factory=dict)  # step id ->
    # the figure it is known by (``StageRecord.headline``)
    records: dict[str, StageRecord] = field(default_factory=dict)  # step id -> its record
    run_id: str | None = None
    nothing_to_do: bool = False
    started: float = field(default_factory=time.perf_counter)


def plan_pipeline(cfg: ExperimentConfig) -> tuple[RunLayout, list[Step]]:
    """The plan from the config and storage alone (no Ray, nothing written but the storage
    folder itself)."""
    layout = RunLayout(resolve_storage(cfg.storage.path))
    return layout, build_plan(cfg, layout)


def run_pipeline(cfg: ExperimentConfig, *, address: str | None = None, track: bool = True,
                 dry_run: bool = False, torch_threads: int = 1) -> PipelineResult:
    """Run every step of ``cfg``'s pipeline that is not done; ``dry_run`` only plans."""
    from vspw_ray.runtime import resolve_address

    check_cluster_settings(cfg, resolve_address(address), track=track)  # before any step
    layout, steps = plan_pipeline(cfg)
    print(format_plan(steps), flush=True)
    result = PipelineResult(steps)
    if dry_run:
        return result
    if not any(s.run for s in steps):
        print("nothing to do: every step is done for these settings", flush=True)
        result.nothing_to_do = True
        return result
    # a killed pipeline's MLflow run is resumed only on the same data (every split it reads)
    key = {"pipeline": cfg.name, "pipeline_data": data.key(cfg)}
    with open_stage(cfg, "pipeline", key, address=address, track=track,
                    trainable=False, run_name=f"{cfg.name}/pipeline") as stage:
        result.run_id = stage.run_id  # every step's run is its child
        _execute(cfg, stage, result, torch_threads)
        _report(cfg, stage, result)
    return result


def _execute(cfg: ExperimentConfig, stage, result: PipelineResult, threads: int) -> None:
    """The data step, the search, then every other step of the plan once the steps it needs
    are done (up to ``pipeline.max_concurrent`` at a time)."""
    ctx = Context(cfg, stage, threads, result)
    by_id = {s.id: s for s in result.steps}
    if by_id["data:all"].run:
        ctx.run(by_id["data:all"])
        # planned before the data step wrote the class priors, which count by their content
        result.steps = build_plan(cfg, stage.layout)
    variants = variants_of(cfg)
    if cfg.pipeline.search:
        sweep = ctx.run({s.id: s for s in result.steps}["search:all"])
        variants = search.chosen_variants(cfg, sweep)
        result.steps = build_plan(cfg, stage.layout, variants)
    ctx.variants = tuple(variants)
    _run_graph(ctx, [s for s in result.steps if s.stage not in (data.NAME, search.NAME)],
               _concurrency(cfg, variants))


def _run_graph(ctx: Context, steps: list[Step], workers: int) -> None:
    """Each step once the steps it needs are done, ``workers`` at a time, the earliest in plan
    order first (so a variant's chain goes on before the next variant starts). The first
    failure stops new steps; those in flight finish (and are recorded) before it is raised. A
    stop (Ctrl-C, SIGTERM) leaves at once."""
    pending, done = list(steps), {s.id for s in ctx.result.steps} - {s.id for s in steps}
    running: dict[Future, Step] = {}
    failure: BaseException | None = None
    pool, stopped = ThreadPoolExecutor(workers), False
    try:
        while running or (pending and failure is None):
            ready = [s for s in pending if set(s.needs) <= done] if failure is None else []
            for step in ready[:workers - len(running)]:
                running[pool.submit(ctx.run, step)] = step
                pending.remove(step)
            if not running:  # a plan's steps need only earlier steps: never reached
                raise RuntimeError(f"pipeline steps wait for steps not in the plan: "
                                   f"{[(s.id, s.needs) for s in pending]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                step = running.pop(future)
                if future.exception() is None:
                    done.add(step.id)
                elif failure is None:
                    failure = future.exception()
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        pool.shutdown(wait=not stopped, cancel_futures=True)
    if failure is not None:
        raise failure


def _concurrency(cfg: ExperimentConfig, variants: list[Variant]) -> int:
    """Variants in flight: ``pipeline.max_concurrent``, else as many as the cluster's GPUs
    (or CPUs) hold at one variant's request."""
    import ray

    if cfg.pipeline.max_concurrent:
        return cfg.pipeline.max_concurrent
    need = variants[0].cfg.train
    key = "GPU" if need.use_gpu else "CPU"
    per = float(dict(need.resources_per_worker).get(key, 1.0)) * need.num_workers + \
        (0 if key == "GPU" else 1)  # a CPU variant also needs its driver's CPU
    return max(1, min(len(variants), int(ray.cluster_resources().get(key, 1) // per)))


def _report(cfg: ExperimentConfig, stage, result: PipelineResult) -> None:
    """The summary table (printed) and ``members.csv`` + ``summary.txt`` in the parent run."""
    import tempfile

    from vspw_ray import tracking
    from vspw_ray.pipeline.steps import members_rows

    table = format_summary(result)
    print(table, flush=True)
    if not stage.run_id:
        return
    log_cost(stage.tracking_uri, stage.run_id, Held(0.0), time.perf_counter() - result.started)
    measured = sum_child_costs(stage.tracking_uri, stage.run_id)  # the stages' resources
    estimated = sum(s.gpu_hours or 0.0 for s in result.steps if s.id in result.ran)
    print(f"measured cost of the steps run: {measured.get('cost/gpu_hours', 0.0):.2f} GPU-hours, "
          f"{measured.get('cost/cpu_hours', 0.0):.3f} CPU-hours (estimated before: "
          f"{estimated:.2f} GPU-hours)", flush=True)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "summary.txt").write_text(table + "\n")
        rows = members_rows(result)
        header = list(rows[0]) if rows else ["step"]
        lines = [",".join(header)] + [",".join(str(r.get(k, "")) for k in header) for r in rows]
        (Path(d) / "members.csv").write_text("\n".join(lines) + "\n")
        for name in ("summary.txt", "members.csv"):
            tracking.log_artifact(stage.tracking_uri, stage.run_id, Path(d) / name)


def format_summary(result: PipelineResult) -> str:
    """Stage, items, skipped, time, headline metric."""
    lines = [f"{'stage':<10} {'items':>5} {'skipped':>7} {'time':>9}  headline"]
    for name in ("data", "search", "train", "swa", "infer", "ensemble"):
        steps = [s for s in result.steps if s.stage == name]
        if not steps:
            continue
        ran = [s for s in steps if s.id in result.ran]
        seconds = sum(result.times.get(s.id, 0.0) for s in steps)
        found = [result.headline[s.id] for s in steps if result.headline.get(s.id)]
        head = ""
        if found:
            figure, value = max(found, key=lambda nv: nv[1])
            best = "best " if len(found) > 1 else ""
            head = f"{best}{HEADLINE_LABELS[figure]} mIoU {100 * value:.2f}"
        lines.append(f"{name:<10} {len(steps):>5} {len(steps) - len(ran):>7} "
                     f"{seconds:>8.1f}s  {head}")
    return "\n".join(lines)

