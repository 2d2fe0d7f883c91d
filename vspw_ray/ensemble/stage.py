"""`vspw-ray ensemble`: choose an ensemble's fusion on val, cross-fitted (chosen on fold A and
scored on B, chosen on B and scored on A) or held out (A chooses, B reports), report it
honestly beside the best single member and the plain mean, and (``--apply test``) write the
submission with the fusion chosen on all of val.

1. **Members** (:mod:`~vspw_ray.ensemble.members`): one per variant (its SWA average's scores
   when stored, else its best checkpoint's) or as ``ensemble.members`` names them; checked for
   class table, fold seed, videos, masks and val leakage before Ray starts.
2. **Groups** (:mod:`~vspw_ray.ensemble.grouping`): explicit or the seed's rule.
3. **Proposals** (:mod:`~vspw_ray.ensemble.methods`, :mod:`~vspw_ray.ensemble.tune_search`):
   ``tune`` | ``grid`` | ``greedy``, one search per fit, sharded over Ray tasks.
4. **Candidates** (:mod:`~vspw_ray.ensemble.core.candidates`): each fit's best few points, every
   member alone and the plain mean, rescored (:mod:`~vspw_ray.ensemble.core.rescore`) on every val
   pixel in one pass; each fit chooses on exact figures (:mod:`~vspw_ray.ensemble.core.outcome`);
   the **report** (:mod:`~vspw_ray.ensemble.report`) under ``<storage>/ensembles/<id>/``. Its
   ``report.json`` is the completion record: a re-run reuses the choice (no search, no refit).
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
from vspw_ray.cost import Held, log_cost
from vspw_ray.data import load_class_table, split_folds
from vspw_ray.data.fingerprint import split_fingerprint
from vspw_ray.ensemble.charts import candidates_chart, class_change_chart, weights_heatmap
from vspw_ray.ensemble.core.candidates import all_candidates, fits_for
from vspw_ray.ensemble.core.outcome import decide
from vspw_ray.ensemble.core.rescore import FusionPlan, rescore
from vspw_ray.ensemble.grouping import format_groups, resolve_groups
from vspw_ray.ensemble.members import (
    EnsembleError,
    Member,
    check_data,
    check_leakage,
    check_members,
    check_scored,
    check_split,
    ensemble_id,
    load_members,
)
from vspw_ray.ensemble.methods import (
    SearchSpace,
    Selection,
    check_search,
    greedy_method,
    grid_method,
)
from vspw_ray.ensemble.raymap import parallelism, ray_map
from vspw_ray.ensemble.report import (
    build_report,
    dumps,
    format_report,
    report_metrics,
    report_mode,
    write_trials_csv,
)
from vspw_ray.ensemble.submit import Submission, write_submission
from vspw_ray.ensemble.tracked import log_ensemble
from vspw_ray.ensemble.tune_search import TuneSetup, optuna_url, tune_method
from vspw_ray.ids import member_for_split
from vspw_ray.runtime import connect_ray, prepare_stage
from vspw_ray.scores.store import ScoreStore
from vspw_ray.storage import filesystem, read_json, write_atomic

__all__ = ["EnsembleResult", "run_ensemble"]

@dataclass(frozen=True)
class EnsembleResult:
    ensemble_id: str
    method: str
    groups: dict[str, list[str]]  # the applied fusion: group -> member keys, the base first
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
    a, b = split_folds(videos, cfg.data.fold_seed)
    if not a or not b:
        raise EnsembleError(f"split '{cfg.data.val_split}' has {len(videos)} video(s): folds A "
                            f"(selection) and B (report) need at least one each")
    return {"A": a, "B": b}


def _prepare(loaded: ExperimentConfig, stage) -> _Context:
    """Every check that needs no Ray: members, class table, fold seed, videos, masks,
    leakage, groups; and the ensemble id."""

    cfg, e = stage.cfg, stage.cfg.ensemble
    members = load_members(loaded, stage.layout)
    check_members(members, cfg, load_class_table(cfg.data.root).names)
    store = ScoreStore(stage.layout.scores)
    frames = check_split(members, store, cfg.data.root, cfg.data.val_split, masks=True)
    check_scored(members, cfg.data.val_split)
    check_data(members, cfg)
    folds = _folds(cfg, list(frames))
    flagged = check_leakage(members, cfg.data.root, cfg.data.val_split,
                            allow=e.allow_val_trained)
    groups, _ = resolve_groups(e, members)
    # members sum inside a group in the decode order (the members' order), in the grid's pass,
    # the rescoring and the submission alike: the same float32 operations give the same labels
    position = {m.key: i for i, m in enumerate(members)}
    groups = {g: sorted(ms, key=position.__getitem__) for g, ms in groups.items()}
    check_search(e, len(groups), members[0].num_classes)
    eid = ensemble_id(cfg, members)
    url = optuna_url(cfg, stage.layout, stage.address) if e.method == "tune" else None
    how = "explicit (ensemble.groups)" if e.groups else "automatic (the seed's rule)"
    print(f"ensemble {eid}: {len(members)} members, groups {how}:\n"
          f"{format_groups(groups, None, members)}", flush=True)
    return _Context(cfg, stage, members, frames, folds, flagged, groups, eid, url)


def _space(ctx: _Context, shards: int):
    e = ctx.cfg.ensemble
    return SearchSpace(ctx.store, ctx.cfg.data.root, ctx.cfg.data.val_split, ctx.folds,
                       fits_for(e.selection), ctx.groups, [m.key for m in ctx.members], e,
                       ctx.num_classes, shards)


def _select(ctx: _Context, shards: int) -> dict[str, Selection]:
    """Run the configured method over the Ray cluster: one selection per fit."""

    e, space = ctx.cfg.ensemble, _space(ctx, shards)
    if e.method == "grid":
        return grid_method(space, ray_map)
    if e.method == "greedy":
        return greedy_method(space, ray_map)

    _remove(f"{ctx.folder}/tune")  # a Tune experiment left by a search that did not finish
    setup = TuneSetup(ctx.optuna_url, ctx.eid, ctx.folder, "tune",
                      max(1, min(shards, e.num_samples)))
    print(f"Tune + Optuna: {e.num_samples} trials per fit ({', '.join(space.fits)}), up to "
          f"{setup.concurrency} at once; studies '{setup.study_name}-<fit>' in "
          f"{setup.optuna_url}", flush=True)
    return tune_method(space, ray_map, setup)


def _remove(path: str) -> None:
    import pyarrow.fs

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(inner)


def _plan(ctx: _Context, groups: dict[str, list[str]], weights: dict[str, float],
          inner: dict[str, float] | None = None, order: list[str] | None = None):
    return FusionPlan(groups, tuple(float(weights[g]) for g in list(groups)[1:]),
                      ctx.cfg.ensemble.space, ctx.num_classes, dict(inner or {}),
                      tuple(order or (m.key for m in ctx.members)),
                      {m.key: m.name for m in ctx.members})


def _candidates(ctx: _Context, selections: dict[str, Selection]) -> list:
    return all_candidates([c for s in selections.values() for c in s.top],
                          [m.key for m in ctx.members], {m.key: m.name for m in ctx.members},
                          ctx.groups)


def _search(ctx: _Context) -> tuple[dict, str, dict[str, Selection]]:
    """Propose fusions per fit, rescore every candidate on all of val, choose, write the
    report; returns ``(report, text, selections)``."""

    e = ctx.cfg.ensemble
    connect_ray(ctx.stage.address)
    shards = parallelism(ctx.stage.address)
    selections = _select(ctx, shards)
    cands = _candidates(ctx, selections)
    order, names = [m.key for m in ctx.members], {m.key: m.name for m in ctx.members}
    start = time.perf_counter()
    print(f"rescoring {len(cands)} candidates on every pixel of {len(ctx.frames)} val videos",
          flush=True)
    rescored = rescore(ctx.store, ctx.cfg.data.root, ctx.cfg.data.val_split, ctx.frames,
                       {c.name: c.plan(e.space, ctx.num_classes, names=names) for c in cands},
                       order, shards, ray_map, agreement=True)
    out = decide(cands, rescored, ctx.folds, fits_for(e.selection), e.selection)
    for sel in selections.values():
        sel.stats["rescore_seconds"] = time.perf_counter() - start
    agreement = {"members": [m.name for m in ctx.members],
                 "matrix": rescored.agreement.round(6).tolist(), "pixels": rescored.pixels}
    report = build_report(ctx.eid, out, selections, ctx.members,
                          load_class_table(ctx.cfg.data.root).names, space=e.space,
                          split=ctx.cfg.data.val_split, fold_seed=ctx.cfg.data.fold_seed,
                          flagged=ctx.flagged, agreement=agreement, seed=e.seed, order=order)
    text = format_report(report, format_groups(out.applied.groups, out.applied.weights,
                                               ctx.members))
    _write_outputs(ctx.folder, report, text, selections, out.by_video)
    return report, text, selections


def _write_outputs(folder: str, report: dict, text: str, selections: dict[str, Selection],
                   by_video: dict) -> None:
    """The report's files into the ensemble folder (local or remote), ``report.json`` last;
    ``video_confusions.npz`` holds each video's confusion matrix as ``VARIANT/VIDEO``
    (ensemble, single, mean, applied), for intervals over videos."""
    import numpy as np

    fs, root = filesystem(folder)
    heat = next((s.heat for s in (selections.get("all"), selections.get("A")) if s and s.heat),
                None)
    with tempfile.TemporaryDirectory() as d:
        local = Path(d)
        (local / "report.txt").write_text(text + "\n")
        np.savez_compressed(local / "video_confusions.npz", **{
            f"{variant}/{video}": m for variant, ms in by_video.items() for video, m in ms.items()})
        write_trials_csv([r for s in selections.values() for r in s.rows], local / "trials.csv")
        if heat is not None:
            weights_heatmap(heat, local / "weights_heatmap.png")
        class_change_chart(report["per_class_change"], local / "per_class_change.png",
                           f"{report['ensemble_id']}: ensemble vs best single member")
        candidates_chart(report, local / "candidates.png")
        for f in sorted(local.iterdir()):
            write_atomic(fs, f"{root}/{f.name}", f.read_bytes())
    write_atomic(fs, f"{root}/report.json", dumps(report).encode())


def _cached(ctx: _Context) -> tuple[dict, str] | None:
    """The report of an earlier run of the same ensemble, with its text, or None."""

    fs, root = filesystem(ctx.folder)
    report = read_json(fs, f"{root}/report.json")
    if report is None:
        return None
    with fs.open_input_stream(f"{root}/report.txt") as f:
        text = f.read().decode().rstrip("\n")
    print(f"ensemble {ctx.eid}: weights chosen by an earlier run (report in {ctx.folder}; "
          f"delete that folder to search again)", flush=True)
    return report, text


def _rekeyed(ctx: _Context, report: dict, split: str) -> tuple[_Context, dict, str]:
    """``ctx`` and ``report`` with every member key moved to the members' scores of ``split``
    (a member key covers one split's data), and that split's data fingerprint."""
    from dataclasses import replace

    data = split_fingerprint(ctx.cfg.data.root, split)
    if split == ctx.cfg.data.val_split:  # the members' keys are val's already
        return ctx, report, data
    new = {m.key: member_for_split(m.key, data) for m in ctx.members}
    report = {**report, "groups": {g: [new[k] for k in ms] for g, ms in report["groups"].items()},
              "inner": {new[k]: w for k, w in (report.get("inner") or {}).items()},
              "order": [new[k] for k in report["order"]] if report.get("order") else None}
    members = [replace(m, key=new[m.key]) for m in ctx.members]
    return replace(ctx, members=members), report, data


def _apply(ctx: _Context, report: dict, split: str) -> Submission:
    """Fuse every grouped member's scores of ``split`` with the applied fusion (chosen on all of
    val under crossfit, on fold A under holdout), unchanged."""

    ctx, report, data = _rekeyed(ctx, report, split)
    groups, weights, inner = report["groups"], report["weights"], report.get("inner") or {}
    # the decode order the report's figures were made in (older reports: the grouped order)
    order = report.get("order") or [m for ms in groups.values() for m in ms]
    used = [m for m in ctx.members if any(m.key in ms for ms in groups.values())]
    frames = check_split(used, ScoreStore(ctx.store), ctx.cfg.data.root, split, masks=False)
    figures = {v: {f: {k: fig[k] for k in ("miou", "fwiou", "vc8", "vc16")}
                   for f, fig in folds.items()} for v, folds in report["figures"].items()}
    identity = {"ensemble_id": ctx.eid, "split": split, "groups": groups, "weights": weights,
                "space": report["space"], "data_fingerprint": data,
                **({"inner": inner} if inner else {})}
    info = {"ensemble_id": ctx.eid, "split": split, "method": report["method"],
            "base_group": report["base_group"], "groups": groups, "weights": weights,
            "inner": inner, "chosen": report.get("chosen", {}).get("name"),
            "selection_mode": report_mode(report),
            "space": report["space"], "fold_seed": report["fold_seed"],
            "members": [{"name": m.name, "key": m.key, "variant_id": m.variant_id,
                         "checkpoint": m.checkpoint} for m in used],
            "val_figures": figures, "transfer_note": report["transfer_note"],
            "applied_val_figures": {f: {k: fig[k] for k in ("miou", "fwiou", "vc8", "vc16")}
                                    for f, fig in (report.get("applied_figures") or {}).items()}}
    connect_ray(ctx.stage.address)
    shards = parallelism(ctx.stage.address)
    print(f"applying ensemble {ctx.eid} to {split}: {len(frames)} videos", flush=True)
    return write_submission(ctx.store, split, ctx.stage.layout.submission(ctx.eid), frames,
                            _plan(ctx, groups, weights, inner, order), identity, info,
                            shards=shards, map_fn=ray_map)


def run_ensemble(cfg: ExperimentConfig, *, apply: str | None = None, address: str | None = None,
                 track: bool = True, parent_run: str | None = None) -> EnsembleResult:
    """Choose (or reuse) the ensemble's fusion on ``data.val_split`` (``ensemble.selection``:
    cross-fitted or held out), report it, and with ``apply`` (a split name: ``test``; ``val``
    works too) write the submission of that split. Its MLflow run is a child of
    ``parent_run`` when given (the pipeline's).

    Raises:
        UserError: bad input (members, groups, splits, scores, settings), named with its fix.
    """

    start = time.perf_counter()
    stage = prepare_stage(cfg, address=address, track=track, trainable=False)
    ctx = _prepare(cfg, stage)
    cached = _cached(ctx)
    if cached is None:
        report, text, selections = _search(ctx)
    else:
        (report, text), selections = cached, None
    print(text, flush=True)
    submission = _apply(ctx, report, apply) if apply else None
    if submission is not None:
        state = f"{submission.written} frames written" if submission.written else "complete before"
        print(f"submission ({apply}): {submission.zip} ({state})", flush=True)
    run_id = None
    if track and stage.tracking_uri:

        run_id = log_ensemble(stage, ctx.eid, ctx.members, report, selections, submission,
                              parent=parent_run)
        if cached is None or (submission is not None and submission.written):
            # the search's and the submission's tasks, spread over this many CPUs
            log_cost(stage.tracking_uri, run_id, Held(parallelism(stage.address)),
                     time.perf_counter() - start)
    return EnsembleResult(ctx.eid, report["method"], report["groups"], report["weights"], report,
                          text, ctx.folder, cached is None, submission, run_id,
                          report_metrics(report))
