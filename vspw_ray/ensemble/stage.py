"""`vspw-ray ensemble`: choose the group weights of an ensemble on fold A of val, report them
honestly on both folds, and (``--apply test``) write the submission.

1. **Members** (:mod:`~vspw_ray.ensemble.members`): one per variant (its SWA average's scores
   when stored, else its best checkpoint's) or as ``ensemble.members`` names them; checked for
   class table, fold seed, videos, masks and val leakage before Ray starts.
2. **Groups** (:mod:`~vspw_ray.ensemble.grouping`): explicit or the seed's rule.
3. **Weights** (:mod:`~vspw_ray.ensemble.methods`, :mod:`~vspw_ray.ensemble.tune_search`):
   ``tune`` | ``grid`` | ``greedy``, sharded over Ray tasks.
4. **Rescoring** (:mod:`~vspw_ray.ensemble.rescore`) of the chosen weights on all of folds A and
   B at full resolution, beside the best single member and the plain mean; the **report**
   (:mod:`~vspw_ray.ensemble.report`) under ``<storage>/ensembles/<id>/``. Its ``report.json``
   is the completion record: a re-run reuses the chosen weights (no search, no refit).
5. **Submission** (:mod:`~vspw_ray.ensemble.submit`) under ``<storage>/submissions/<id>/``.
6. **MLflow** (:mod:`~vspw_ray.ensemble.tracked`): one run per ensemble, opened once the
   weights are known so that its params hold them; the Tune trials as its child runs.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vspw_ray.config import ExperimentConfig
from vspw_ray.ensemble.members import EnsembleError, Member
from vspw_ray.ensemble.methods import Selection
from vspw_ray.ensemble.submit import Submission

__all__ = ["EnsembleResult", "run_ensemble"]

@dataclass(frozen=True)
class EnsembleResult:
    ensemble_id: str
    method: str
    groups: dict[str, list[str]]  # group -> member keys, the base group first
    weights: dict[str, float]  # the free groups' weights (the base group's is 1)
    report: dict  # report.json (see vspw_ray.ensemble.report.build_report)
    summary: str  # the printed report
    path: str  # <storage>/ensembles/<id>
    searched: bool  # False: the weights were chosen by an earlier run
    submission: Submission | None
    run_id: str | None
    metrics: dict[str, float]  # as logged: final/val_A/miou, final/val_B/miou, single/..., ...


@dataclass(frozen=True)
class _Context:
    """What every step after the checks works with."""

    cfg: ExperimentConfig  # prepared: paths absolute
    stage: Any  # the untracked vspw_ray.runtime.Stage (layout, address, tracking URI)
    members: list[Member]
    frames: dict[str, list[str]]  # val video -> frame names
    folds: dict[str, list[str]]  # "A" / "B" -> val videos
    flagged: dict[str, list[str]]  # val-trained member -> overlapping videos
    groups: dict[str, list[str]]  # the configured or automatic grouping, base first
    eid: str
    optuna_url: str | None  # the study storage (method tune)

    @property
    def folder(self) -> str:
        return self.stage.layout.ensemble(self.eid)

    @property
    def store(self) -> str:
        return self.stage.layout.scores

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes


def _folds(cfg: ExperimentConfig, videos: list[str]) -> dict[str, list[str]]:
    from vspw_ray.data import split_folds

    a, b = split_folds(videos, cfg.data.fold_seed)
    if not a or not b:
        raise EnsembleError(f"split '{cfg.data.val_split}' has {len(videos)} video(s): folds A "
                            f"(selection) and B (report) need at least one each")
    return {"A": a, "B": b}


def _prepare(loaded: ExperimentConfig, stage) -> _Context:
    """Every check that needs no Ray: members, class table, fold seed, videos, masks,
    leakage, groups; and the ensemble id."""
    from vspw_ray.data import load_class_table
    from vspw_ray.ensemble.grouping import format_groups, resolve_groups
    from vspw_ray.ensemble.members import (
        check_leakage,
        check_members,
        check_scored,
        check_split,
        ensemble_id,
        load_members,
    )
    from vspw_ray.ensemble.methods import check_search
    from vspw_ray.ensemble.tune_search import optuna_url
    from vspw_ray.scores.store import ScoreStore

    cfg, e = stage.cfg, stage.cfg.ensemble
    members = load_members(loaded, stage.layout)
    check_members(members, cfg, load_class_table(cfg.data.root).names)
    store = ScoreStore(stage.layout.scores)
    frames = check_split(members, store, cfg.data.root, cfg.data.val_split, masks=True)
    check_scored(members, cfg.data.val_split)
    folds = _folds(cfg, list(frames))
    flagged = check_leakage(members, cfg.data.root, cfg.data.val_split,
                            allow=e.allow_val_trained)
    groups, _ = resolve_groups(e, members)
    check_search(e, len(groups), members[0].num_classes)
    eid = ensemble_id(cfg, members)
    url = optuna_url(cfg, stage.layout, stage.address) if e.method == "tune" else None
    how = "explicit (ensemble.groups)" if e.groups else "automatic (the seed's rule)"
    print(f"ensemble {eid}: {len(members)} members, groups {how}:\n"
          f"{format_groups(groups, None, members)}", flush=True)
    return _Context(cfg, stage, members, frames, folds, flagged, groups, eid, url)


def _select(ctx: _Context, shards: int) -> Selection:
    """Run the configured method over the Ray cluster."""
    from vspw_ray.ensemble.methods import SearchSpace, greedy_method, grid_method
    from vspw_ray.ensemble.raymap import ray_map

    e = ctx.cfg.ensemble
    space = SearchSpace(ctx.store, ctx.cfg.data.root, ctx.cfg.data.val_split, ctx.folds["A"],
                        ctx.folds["B"], ctx.groups, [m.key for m in ctx.members], e,
                        ctx.num_classes, shards)
    if e.method == "grid":
        return grid_method(space, ray_map)
    if e.method == "greedy":
        return greedy_method(space, ray_map)
    from vspw_ray.ensemble.tune_search import TuneSetup, tune_method

    _remove(f"{ctx.folder}/tune")  # a Tune experiment left by a search that did not finish
    setup = TuneSetup(ctx.optuna_url, ctx.eid, ctx.folder, "tune",
                      max(1, min(shards, e.num_samples)))
    print(f"Tune + Optuna: {e.num_samples} trials, up to {setup.concurrency} at once; study "
          f"'{setup.study_name}' in {setup.optuna_url}", flush=True)
    return tune_method(space, ray_map, setup)


def _remove(path: str) -> None:
    import pyarrow.fs

    from vspw_ray.storage import filesystem

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(inner)


def _best(members: list[Member]) -> Member:
    return max(members, key=lambda m: (m.miou_a, m.name))


def _plan(ctx: _Context, groups: dict[str, list[str]], weights: dict[str, float], *,
          baselines: bool):
    from vspw_ray.ensemble.rescore import FusionPlan

    return FusionPlan(groups, tuple(float(weights[g]) for g in list(groups)[1:]),
                      ctx.cfg.ensemble.space, ctx.num_classes,
                      members=tuple(m.key for m in ctx.members) if baselines else (),
                      best=_best(ctx.members).key if baselines else None,
                      names={m.key: m.name for m in ctx.members})


def _search(ctx: _Context) -> tuple[dict, str, Selection]:
    """Choose the weights, rescore them on folds A and B, write the report; returns
    ``(report, text, selection)``."""
    from vspw_ray.data import load_class_table
    from vspw_ray.ensemble.grouping import format_groups
    from vspw_ray.ensemble.raymap import parallelism, ray_map
    from vspw_ray.ensemble.report import build_report, fold_b_intervals, format_report
    from vspw_ray.ensemble.rescore import rescore
    from vspw_ray.runtime import connect_ray

    connect_ray(ctx.stage.address)
    shards = parallelism(ctx.stage.address)
    sel = _select(ctx, shards)
    plan = _plan(ctx, sel.groups, sel.weights, baselines=True)
    start = time.perf_counter()
    totals, by_video = rescore(ctx.store, ctx.cfg.data.root, ctx.cfg.data.val_split,
                               ctx.folds, ctx.frames, plan, shards, ray_map)
    sel.stats["rescore_seconds"] = time.perf_counter() - start
    names = load_class_table(ctx.cfg.data.root).names
    report = build_report(ctx.eid, sel, ctx.members, totals, names,
                          space=ctx.cfg.ensemble.space, split=ctx.cfg.data.val_split,
                          fold_seed=ctx.cfg.data.fold_seed, flagged=ctx.flagged,
                          intervals=fold_b_intervals(by_video, ctx.folds["B"],
                                                     ctx.cfg.ensemble.seed))
    text = format_report(report, format_groups(sel.groups, sel.weights, ctx.members))
    _write_outputs(ctx.folder, report, text, sel, by_video)
    return report, text, sel


def _write_outputs(folder: str, report: dict, text: str, sel: Selection,
                   by_video: dict) -> None:
    """The report's files into the ensemble folder (local or remote), ``report.json`` last;
    ``video_confusions.npz`` holds each video's confusion matrix as ``VARIANT/VIDEO``
    (ensemble, single, mean), for intervals over videos."""
    import numpy as np

    from vspw_ray.ensemble.charts import class_change_chart, weights_heatmap
    from vspw_ray.ensemble.files import write_atomic
    from vspw_ray.ensemble.report import dumps, write_trials_csv
    from vspw_ray.storage import filesystem

    fs, root = filesystem(folder)
    with tempfile.TemporaryDirectory() as d:
        local = Path(d)
        (local / "report.txt").write_text(text + "\n")
        np.savez_compressed(local / "video_confusions.npz", **{
            f"{variant}/{video}": m for variant, ms in by_video.items() for video, m in ms.items()})
        write_trials_csv(sel.rows, local / "trials.csv")
        if sel.heat is not None:
            weights_heatmap(sel.heat, local / "weights_heatmap.png")
        class_change_chart(report["per_class_change"], local / "per_class_change.png",
                           f"{report['ensemble_id']}: ensemble vs best single member")
        for f in sorted(local.iterdir()):
            write_atomic(fs, f"{root}/{f.name}", f.read_bytes())
    write_atomic(fs, f"{root}/report.json", dumps(report).encode())


def _cached(ctx: _Context) -> tuple[dict, str] | None:
    """The report of an earlier run of the same ensemble, with its text, or None."""
    from vspw_ray.ensemble.files import read_json
    from vspw_ray.storage import filesystem

    fs, root = filesystem(ctx.folder)
    report = read_json(fs, f"{root}/report.json")
    if report is None:
        return None
    with fs.open_input_stream(f"{root}/report.txt") as f:
        text = f.read().decode().rstrip("\n")
    print(f"ensemble {ctx.eid}: weights chosen by an earlier run (report in {ctx.folder}; "
          f"delete that folder to search again)", flush=True)
    return report, text


def _apply(ctx: _Context, report: dict, split: str) -> Submission:
    """Fuse every grouped member's scores of ``split`` with the fold-A weights, unchanged."""
    from vspw_ray.ensemble.members import check_split
    from vspw_ray.ensemble.raymap import parallelism, ray_map
    from vspw_ray.ensemble.submit import write_submission
    from vspw_ray.runtime import connect_ray
    from vspw_ray.scores.store import ScoreStore

    groups, weights = report["groups"], report["weights"]
    used = [m for m in ctx.members if any(m.key in ms for ms in groups.values())]
    frames = check_split(used, ScoreStore(ctx.store), ctx.cfg.data.root, split, masks=False)
    figures = {v: {f: {k: report["figures"][v][f][k] for k in ("miou", "fwiou", "vc8", "vc16")}
                   for f in ("A", "B")} for v in report["figures"]}
    identity = {"ensemble_id": ctx.eid, "split": split, "groups": groups, "weights": weights,
                "space": report["space"]}
    info = {"ensemble_id": ctx.eid, "split": split, "method": report["method"],
            "base_group": report["base_group"], "groups": groups, "weights": weights,
            "space": report["space"], "fold_seed": report["fold_seed"],
            "members": [{"name": m.name, "key": m.key, "variant_id": m.variant_id,
                         "checkpoint": m.checkpoint} for m in used],
            "val_figures": figures, "transfer_note": report["transfer_note"]}
    connect_ray(ctx.stage.address)
    shards = parallelism(ctx.stage.address)
    print(f"applying ensemble {ctx.eid} to {split}: {len(frames)} videos", flush=True)
    return write_submission(ctx.store, split, ctx.stage.layout.submission(ctx.eid), frames,
                            _plan(ctx, groups, weights, baselines=False), identity, info,
                            shards=shards, map_fn=ray_map)


def run_ensemble(cfg: ExperimentConfig, *, apply: str | None = None, address: str | None = None,
                 track: bool = True) -> EnsembleResult:
    """Choose (or reuse) the ensemble's weights on fold A of ``data.val_split``, report them on
    folds A and B, and with ``apply`` (a split name: ``test``; ``val`` works too) write the
    submission of that split.

    Raises:
        UserError: bad input (members, groups, splits, scores, settings), named with its fix.
    """
    from vspw_ray.ensemble.report import report_metrics
    from vspw_ray.runtime import open_stage, resolve_address
    from vspw_ray.storage import check_cluster_settings

    check_cluster_settings(cfg, resolve_address(address), track=track)
    with open_stage(cfg, "ensemble", {}, address=address, track=False, connect=False,
                    trainable=False) as stage:
        ctx = _prepare(cfg, stage)
    cached = _cached(ctx)
    if cached is None:
        report, text, sel = _search(ctx)
    else:
        (report, text), sel = cached, None
    print(text, flush=True)
    submission = _apply(ctx, report, apply) if apply else None
    if submission is not None:
        state = f"{submission.written} frames written" if submission.written else "complete before"
        print(f"submission ({apply}): {submission.zip} ({state})", flush=True)
    run_id = None
    if track and stage.tracking_uri:
        from vspw_ray.ensemble.tracked import log_ensemble

        run_id = log_ensemble(stage, ctx.eid, ctx.members, report, sel, submission)
    return EnsembleResult(ctx.eid, report["method"], report["groups"], report["weights"], report,
                          text, ctx.folder, cached is None, submission, run_id,
                          report_metrics(report))
