"""How the pipeline runs one step: its stage's ``run`` in a :class:`StageContext` holding the
records of the steps done so far, a live marker while it runs, its completion record (with the
cost its run measured) when it finishes, and a failure named with the command that resumes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vspw_ray.config import ExperimentConfig
from vspw_ray.cost import run_cost
from vspw_ray.errors import UserError
from vspw_ray.pipeline.plan import Step
from vspw_ray.stages import STAGES, StageContext, StageRecord, Variant
from vspw_ray.stages.base import FINAL_METRICS
from vspw_ray.stages.records import (
    HEARTBEAT_S,
    clear_marker,
    read_record,
    write_marker,
    write_record,
)

__all__ = ["StageFailed", "Context", "members_rows"]


class StageFailed(UserError):
    """A step failed: names the stage, the variant and the command that re-runs it."""


@dataclass
class Context:
    cfg: ExperimentConfig
    stage: Any  # the pipeline's runtime.Stage: its layout, address, tracking URI and run
    threads: int
    result: Any  # run.PipelineResult
    variants: tuple[Variant, ...] = ()  # the experiment's, or the search's choices
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: dict[str, tuple[str, float]] = field(default_factory=dict)  # running: key, start
    heartbeat: threading.Thread | None = None

    @property
    def track(self) -> bool:
        return self.stage.run_id is not None

    def stage_context(self, step: Step) -> StageContext:
        """Where ``step`` runs: the pipeline's cluster, its MLflow run as the parent (none when
        the pipeline is not tracked), the records of the steps done so far."""
        with self.lock:
            records = dict(self.result.records)
        return StageContext(self.cfg, address=self.stage.address, track=self.track,
                            parent_run=self.stage.run_id, threads=self.threads,
                            tracking_uri=getattr(self.stage, "tracking_uri", None)
                            if self.track else None,
                            variants=self.variants, records=records, planned_key=step.key)

    def run(self, step: Step,
            fn: Callable[[StageContext, str], StageRecord] | None = None) -> StageRecord:
        """Run ``step`` (its stage's ``run``, or ``fn``) unless it is done (then its record
        stands in); record it when it finishes; a failure names the stage, the item and the
        command that re-runs it."""
        module = STAGES[step.stage]
        if not step.run:
            stored = read_record(self.stage.layout, self.cfg.name, step.id) or {}
            record = module.Record.from_outputs(stored.get("outputs", {}))
            with self.lock:
                self.result.records[step.id] = record
            return record
        # one write with its newline: steps start in several threads at once, and print()'s
        # separate write of the end of line lets their lines run together
        print(f"[pipeline] {step.id}: {step.reason}\n", end="", flush=True)
        start = time.perf_counter()
        try:
            with self._running(step):
                record = (fn or module.run)(self.stage_context(step), step.item)
        except Exception as err:
            raise StageFailed(
                f"pipeline step {step.id} failed ({step.stage} of {step.item}): "
                f"{type(err).__name__}: {err}. Fix it and re-run the same `vspw-ray pipeline` "
                f"command: finished steps are skipped and this one resumes") from err
        # what the step's run measured, kept with its record (`vspw-ray status` reads records)
        if self.track:
            record = record.with_figures(run_cost(self.stage.tracking_uri, record.run_id))
        write_record(self.stage.layout, self.cfg.name, step.id, step.key, record.outputs())
        with self.lock:
            self.result.ran.append(step.id)
            self.result.times[step.id] = time.perf_counter() - start
            self.result.records[step.id] = record
            self.result.headline[step.id] = record.headline
        return record

    @contextlib.contextmanager
    def _running(self, step: Step) -> Iterator[None]:
        """A live marker for ``step`` while it runs (``vspw-ray status`` shows it running),
        refreshed by one heartbeat thread for all steps in flight."""
        layout, name, started = self.stage.layout, self.cfg.name, time.time()
        write_marker(layout, name, step.id, step.key, started)
        with self.lock:
            self.active[step.id] = (step.key, started)
            if self.heartbeat is None:
                self.heartbeat = threading.Thread(target=self._beat, daemon=True,
                                                  name="pipeline-heartbeat")
                self.heartbeat.start()
        try:
            yield
        finally:
            with self.lock:
                self.active.pop(step.id, None)
            clear_marker(layout, name, step.id)

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self.lock:
                active = dict(self.active)
            for step_id, (key, started) in active.items():
                try:
                    write_marker(self.stage.layout, self.cfg.name, step_id, key, started)
                except OSError as err:  # storage unreachable for a moment: the next beat retries
                    print(f"[pipeline] could not refresh the running marker of {step_id}: "
                          f"{err}", flush=True)


def members_rows(result) -> list[dict]:
    """One row per member and stage: step, stage, variant, key, MLflow run, the fingerprint of
    the data it read (the variant's training and val data; an inferred split's), final
    metrics."""
    rows = []
    for step in result.steps:
        if step.stage not in ("train", "swa", "infer", "ensemble"):
            continue
        record = result.records.get(step.id) or STAGES[step.stage].Record()
        rows.append({"step": step.id, "stage": step.stage, "item": step.item, "key": step.key,
                     "ran": step.id in result.ran, "run_id": record.run_id or "",
                     "data_fingerprint": record.data_fingerprint,
                     **{k: record.figures.get(f"final/{k}", "") for k in FINAL_METRICS}})
    return rows
