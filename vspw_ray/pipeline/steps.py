"""What each pipeline step does: a thin call of the stage's own function, its completion record,
and the common final keys on the stage's MLflow run."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from vspw_ray.config import ExperimentConfig, variant_fingerprint
from vspw_ray.cost import run_cost
from vspw_ray.data.fingerprint import split_fingerprint
from vspw_ray.errors import UserError
from vspw_ray.layout import bind_teacher
from vspw_ray.metrics import fold_metric
from vspw_ray.pipeline.plan import Step, Variant, teacher_of
from vspw_ray.pipeline.records import (
    HEARTBEAT_S,
    clear_marker,
    headline,
    read_record,
    write_marker,
    write_record,
)

__all__ = ["StageFailed", "Context", "data_step", "search_step", "recorded_variants", "variant_chain",
           "ensemble_step", "members_rows", "FINAL_METRICS"]

FINAL_METRICS = tuple(fold_metric(f, k) for f in ("A", "B") for k in ("miou", "fwiou", "vc8",
                                                                       "vc16"))


class StageFailed(UserError):
    """A step failed: names the stage, the variant and the command that re-runs it."""


@dataclass
class Context:
    cfg: ExperimentConfig
    stage: Any  # the pipeline's runtime.Stage
    threads: int
    result: Any  # run.PipelineResult
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: dict[str, tuple[str, float]] = field(default_factory=dict)  # running: key, start
    heartbeat: threading.Thread | None = None

    @property
    def track(self) -> bool:
        return self.stage.run_id is not None

    @property
    def where(self) -> dict[str, Any]:
        """Where every stage of the pipeline runs and is tracked: its cluster, and its MLflow
        run as the child of the pipeline's (none when the pipeline is not tracked)."""
        return {"address": self.stage.address, "track": self.track,
                "parent_run": self.stage.run_id}

    def run(self, step: Step, fn: Callable[[Context, Step], dict | None]) -> Any:
        """Run ``fn`` for ``step`` unless it is done (then its record's outputs stand in);
        record it when it finishes; a failure names the stage, the item and the command that
        re-runs it."""
        if not step.run:
            outputs = (read_record(self.stage.layout, self.cfg.name, step.id) or {}).get(
                "outputs", {})
            with self.lock:
                self.result.outputs[step.id] = outputs
            return outputs.get("_value")
        print(f"[pipeline] {step.id}: {step.reason}", flush=True)
        start = time.perf_counter()
        try:
            with self._running(step):
                outputs = fn(self, step) or {}
        except Exception as err:
            raise StageFailed(
                f"pipeline step {step.id} failed ({step.stage} of {step.item}): "
                f"{type(err).__name__}: {err}. Fix it and re-run the same `vspw-ray pipeline` "
                f"command: finished steps are skipped and this one resumes") from err
        # what the step's run measured, kept with its record (`vspw-ray status` reads records)
        if self.track:
            outputs = {**outputs, **run_cost(self.stage.tracking_uri, outputs.get("run_id"))}
        write_record(self.stage.layout, self.cfg.name, step.id, step.key,
                     {k: v for k, v in outputs.items() if k != "_value"})
        with self.lock:
            self.result.ran.append(step.id)
            self.result.times[step.id] = time.perf_counter() - start
            self.result.outputs[step.id] = outputs
            self.result.headline[step.id] = headline(step.stage, outputs)
        return outputs.get("_value")

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

    def outputs(self, step_id: str) -> dict:
        with self.lock:
            return dict(self.result.outputs.get(step_id, {}))


def data_step(ctx: Context, step: Step) -> dict:
    """Check every split the pipeline reads; write the class prior where logit-adjusted
    variants expect it; record the data's fingerprints (the data must not have changed since
    the plan fingerprinted it)."""
    from pathlib import Path

    from vspw_ray.data.check import check_dataset
    from vspw_ray.data.fingerprint import clear_cache, data_fingerprint
    from vspw_ray.data.stats import class_stats, write_stats
    from vspw_ray.errors import DataError
    from vspw_ray.pipeline.keys import data_key, data_splits
    from vspw_ray.pipeline.plan import variants_of

    cfg = ctx.cfg
    splits = data_splits(cfg)
    clear_cache()  # fingerprint the files as they are now, not as planned
    if data_key(cfg) != step.key:
        raise DataError(f"the data under {cfg.data.root} changed while the pipeline planned "
                        f"(its fingerprint differs); re-run the same command to plan on it")
    problems = check_dataset(cfg.data.root, splits)
    if problems:
        shown = "; ".join(str(p) for p in problems[:5])
        raise DataError(f"{len(problems)} problems in {cfg.data.root}: {shown} (vspw-ray data "
                        f"check {cfg.data.root} lists them all)")
    priors = {v.cfg.loss.logit_adjust.prior for v in variants_of(cfg)
              if v.cfg.loss.logit_adjust.enabled and v.cfg.loss.logit_adjust.prior}
    for prior in sorted(priors):
        write_stats(class_stats(cfg.data.root, cfg.data.train_split), Path(prior).parent)
    return {"splits": splits, "priors": sorted(priors),
            "data_fingerprint": data_fingerprint(cfg.data.root, splits),
            "split_fingerprints": {s: data_fingerprint(cfg.data.root, (s,)) for s in splits}}


def search_step(ctx: Context, step: Step) -> dict:
    from vspw_ray.tune.search import run_search

    out = run_search(ctx.cfg, **ctx.where, torch_threads=ctx.threads)
    return {"best_configs": list(out.best_configs), "sweep_id": out.sweep_id,
            "_value": best_variants(ctx.cfg, out.best_configs)}


def recorded_variants(ctx: Context) -> list[Variant]:
    """The variants a finished search chose (from its record)."""
    return best_variants(ctx.cfg, ctx.outputs("search:all").get("best_configs", []))


def best_variants(cfg: ExperimentConfig, paths: list[str]) -> list[Variant]:
    """The sweep's best configurations as the pipeline's variants (read through pyarrow, local
    or remote)."""
    from vspw_ray.config import config_from_dict, load_yaml, to_dict
    from vspw_ray.storage import filesystem

    variants = []
    for i, path in enumerate(paths, 1):
        fs, inner = filesystem(path)
        with fs.open_input_stream(inner) as f:
            data = load_yaml(f.read().decode())
        data.update(storage={"path": cfg.storage.path}, tracking=to_dict(cfg.tracking),
                    pipeline={**data.get("pipeline", {}), "search": False}, variants=[])
        variants.append(Variant(f"best{i}", config_from_dict(data)))
    return variants


def variant_chain(ctx: Context, v: Variant, by_id: dict[str, Step],
                  models: dict[str, Future]) -> None:
    """train -> SWA -> inference of each split, for one variant. A self-distillation student
    first waits for its teacher's model (``models[teacher]``, resolved once the teacher's
    training or SWA step is done); ``models[v.name]`` is resolved likewise for its students."""
    mine = models[v.name]
    try:
        teacher = teacher_of(v)
        if teacher:
            models[teacher].result()  # raises when the teacher's chain failed
            v = Variant(v.name, bind_teacher(ctx.cfg, v.cfg))
        ctx.run(by_id[f"train:{v.name}"], lambda c, s: _train(c, v))
        if f"swa:{v.name}" in by_id:
            ctx.run(by_id[f"swa:{v.name}"], lambda c, s: _swa(c, v))
    except BaseException as err:
        mine.set_exception(err)
        raise
    mine.set_result(True)
    for split in ctx.cfg.pipeline.splits:
        ctx.run(by_id[f"infer:{v.name}/{split}"], lambda c, s, split=split: _infer(c, v, split))


def _train(ctx: Context, v: Variant) -> dict:
    from vspw_ray.train.driver import train_variant

    out = train_variant(v.cfg, None, **ctx.where, torch_threads=ctx.threads, label=v.name)
    finals = _finals(out.metrics)
    _mark(ctx, out.run_id, finals, v, swa=False)
    return {"variant_id": out.variant_id, "checkpoint": out.best_checkpoint,
            "run_id": out.run_id, "data_fingerprint": variant_fingerprint(v.cfg), **finals}


def _swa(ctx: Context, v: Variant) -> dict:
    from vspw_ray.train.swa import swa_variant

    out = swa_variant(v.cfg, None, from_checkpoint=ctx.outputs(f"train:{v.name}").get(
        "checkpoint"), **ctx.where, torch_threads=ctx.threads, label=v.name)
    finals = _finals({k.removeprefix("swa/"): m for k, m in out.metrics.items()
                      if k.startswith("swa/")})
    _mark(ctx, out.run_id, finals, v, swa=True)
    return {"variant_id": out.variant_id, "checkpoint": out.checkpoint, "run_id": out.run_id,
            "data_fingerprint": variant_fingerprint(v.cfg), **finals}


def _infer(ctx: Context, v: Variant, split: str) -> dict:
    from vspw_ray.infer.job import run_inference

    model = ctx.outputs(f"swa:{v.name}") or ctx.outputs(f"train:{v.name}")
    out = run_inference(v.cfg, model.get("checkpoint"), split, **ctx.where,
                        torch_threads=ctx.threads, label=v.name)
    # the common final/val_{A,B}/... keys name folds of the val split: a test split's own
    # figures stay under the stage's "<split>/..." keys, never relabelled as val
    finals = _finals(out.metrics or {}) if split == v.cfg.data.val_split else {}
    _mark(ctx, out.run_id, finals, v, swa=bool(ctx.outputs(f"swa:{v.name}")))
    return {"member_key": out.key, "variant_id": out.variant_id, "run_id": out.run_id,
            "predictions": out.predictions,
            "data_fingerprint": split_fingerprint(v.cfg.data.root, split), **finals}


def ensemble_step(ctx: Context, step: Step, variants: list[Variant]) -> dict:
    """The ensemble search and, with test among ``pipeline.splits``, the submission."""
    from vspw_ray.ensemble.stage import run_ensemble

    cfg = _with_variants(ctx.cfg, variants)
    apply = cfg.data.test_split if cfg.data.test_split in ctx.cfg.pipeline.splits else None
    out = run_ensemble(cfg, apply=apply, **ctx.where)
    return {"ensemble_id": out.ensemble_id, "method": out.method, "weights": out.weights,
            "submission": out.submission.folder if out.submission else None,
            "zip": out.submission.zip if out.submission else None, "run_id": out.run_id,
            "data_fingerprint": split_fingerprint(cfg.data.root, cfg.data.val_split),
            **{k: v for k, v in out.metrics.items()
               if k.startswith(("final/", "oof/ensemble/"))}}


def _with_variants(cfg: ExperimentConfig, variants: list[Variant]) -> ExperimentConfig:
    """``cfg`` listing ``variants`` (a search's best configurations become variants whose
    overrides are every identity key of theirs)."""
    from dataclasses import replace

    from vspw_ray.config import VariantSpec, to_dict

    if [v.name for v in variants] == [s.name for s in cfg.variants]:
        return cfg
    specs = []
    for v in variants:
        data = to_dict(v.cfg)
        overrides = {k: val for section in ("data", "model", "loss", "train", "swa", "infer")
                     for k, val in _leaves(data[section], section)}
        specs.append(VariantSpec(v.name, v.cfg.seed, overrides))
    return replace(cfg, variants=tuple(specs))


def _leaves(node: Any, prefix: str):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}")
    else:
        yield prefix, node


def _finals(metrics: dict) -> dict[str, float]:
    """The common final keys (``final/val_A/miou``, ...) from a stage's fold metrics."""
    return {f"final/{k}": float(metrics[k]) for k in FINAL_METRICS
            if isinstance(metrics.get(k), (int, float))}


def _mark(ctx: Context, run_id: str | None, finals: dict, v: Variant, *, swa: bool) -> None:
    """The same final metrics and short params on every member run, so runs of every stage
    sort and compare side by side in the MLflow UI and ``mlflow.search_runs``."""
    from vspw_ray import tracking

    if not run_id or not ctx.track:
        return
    c = v.cfg
    la, ohem = c.loss.logit_adjust, c.loss.ohem
    params = {"family": c.model.family, "crop": "x".join(map(str, c.data.crop_size)),
              "ohem": f"{ohem.thresh:g}" if ohem.enabled else "off",
              "tau": f"{la.tau:g}" if la.enabled else "off",
              "distill": str(c.loss.distill.enabled).lower(), "swa": str(swa).lower(),
              "tta": f"{list(c.infer.scales)}{'+flip' if c.infer.flip else ''}",
              "pipeline_variant": v.name}
    tracking.log_metrics(ctx.stage.tracking_uri, run_id, finals, 0)
    tracking.log_new_params(ctx.stage.tracking_uri, run_id, params)


def members_rows(result) -> list[dict]:
    """One row per member and stage: step, stage, variant, key, MLflow run, the fingerprint of
    the data it read (the variant's training and val data; an inferred split's), final
    metrics."""
    rows = []
    for step in result.steps:
        if step.stage not in ("train", "swa", "infer", "ensemble"):
            continue
        out = result.outputs.get(step.id, {})
        rows.append({"step": step.id, "stage": step.stage, "item": step.item, "key": step.key,
                     "ran": step.id in result.ran, "run_id": out.get("run_id", ""),
                     "data_fingerprint": out.get("data_fingerprint", ""),
                     **{k: out.get(f"final/{k}", "") for k in FINAL_METRICS}})
    return rows
