"""The ensemble's MLflow run (one per ensemble, tags ``stage=ensemble`` and ``ensemble_id``),
opened once the weights are known so that its params hold them: the fold figures as metrics,
the report's files as artifacts, the Tune trials as child runs, the submission's manifest."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vspw_ray import tracking
from vspw_ray.config import to_dict, variant_fingerprint
from vspw_ray.ensemble.members import Member
from vspw_ray.ensemble.methods import Selection
from vspw_ray.ensemble.report import report_metrics
from vspw_ray.ensemble.submit import Submission
from vspw_ray.runtime import stage_run
from vspw_ray.storage import filesystem

__all__ = ["REPORT_FILES", "log_ensemble"]

REPORT_FILES = ("report.txt", "trials.csv", "weights_heatmap.png", "per_class_change.png",
                "candidates.png")


def _fetch(folder: str, names: tuple[str, ...], local: Path) -> list[Path]:
    """Copy the named files that exist in ``folder`` (storage) into ``local``."""
    import pyarrow.fs

    fs, root = filesystem(folder)
    out = []
    for name in names:
        if fs.get_file_info(f"{root}/{name}").type == pyarrow.fs.FileType.File:
            with fs.open_input_stream(f"{root}/{name}") as f:
                (local / name).write_bytes(f.read())
            out.append(local / name)
    return out


def _child_runs(uri: str, experiment: str, storage: str, parent: str, eid: str,
                selections: dict[str, Selection], data: str) -> None:
    """The Tune trials as child runs of the ensemble's run (in a thread of their own: MLflow's
    active run is per thread, and the parent's is open)."""
    from concurrent.futures import ThreadPoolExecutor

    def log_all() -> None:
        for fit, sel in selections.items():
            for row in sel.rows:
                tags = {tracking.PARENT_TAG: parent, "ensemble_id": eid,
                        "stage": "ensemble-trial", "optuna_trial": str(row.number), "fit": fit,
                        "data_fingerprint": data}
                params = {f"weight.{g}": str(w) for g, w in row.params.items()}
                metrics = {"sample/selecting/miou": row.val_a}
                if row.val_b is not None:
                    metrics["sample/checking/miou"] = row.val_b
                with tracking.open_run(uri, experiment, storage,
                                       run_name=f"ensemble/{fit}/trial-{row.number}", tags=tags,
                                       params=params) as rid:
                    tracking.log_metrics(uri, rid, metrics, 0)

    with ThreadPoolExecutor(1) as pool:
        pool.submit(log_all).result()


def _log_submission(uri: str, rid: str, submission: Submission | None) -> None:
    if submission is None:
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "manifest.json"
        path.write_text(json.dumps(submission.manifest, indent=1, default=float))
        tracking.log_artifact(uri, rid, path, f"submission_{submission.manifest['split']}")
    tracking.log_metrics(uri, rid, {f"submission/{submission.manifest['split']}/frames":
                                    submission.manifest["frames"]}, 0)


def log_ensemble(stage, eid: str, members: Sequence[Member], report: dict,
                 selections: dict[str, Selection] | None, submission: Submission | None, *,
                 parent: str | None = None) -> str:
    """The ensemble's MLflow run: params (config, members, groups, weights, method), the fold
    figures, the report's files, the Tune trials as child runs and the submission's manifest.
    A re-run that reused the weights only adds its submission to the run that chose them.

    Args:
        stage: the stage's :class:`vspw_ray.runtime.Prepared` settings: config, layout,
            tracking URI and experiment.
        selections: the searches of this run, by fit; None when an earlier run chose.
        parent: the MLflow run the ensemble's run is a child of (the pipeline's).

    Returns:
        The run's id.
    """

    uri, experiment, folder = stage.tracking_uri, stage.experiment, stage.layout.ensemble(eid)
    tags = {"ensemble_id": eid}
    earlier = tracking.find_run(uri, experiment, {**tags, "stage": "ensemble"}, unfinished=False)
    if earlier and selections is None:
        _log_submission(uri, earlier, submission)
        return earlier
    params = {**tracking.flatten(to_dict(stage.cfg)), "method": report["method"],
              **{k: json.dumps(report.get(k) or {})[:6000] for k in ("groups", "weights",
                                                                      "inner")},
              "selection_mode": report.get("selection_mode", "holdout"),
              "chosen": (report.get("chosen") or {}).get("name", ""),
              "members": json.dumps([m.key for m in members])[:6000]}
    with stage_run(stage, "ensemble", tags, connect=False, run_name=f"ensemble/{report['method']}",
                   params=params, parent=parent) as opened:
        rid = opened.run_id
        tracking.log_metrics(uri, rid, report_metrics(report), 0)
        with tempfile.TemporaryDirectory() as d:
            for f in _fetch(folder, ("report.json", *REPORT_FILES), Path(d)):
                tracking.log_artifact(uri, rid, f)
        if selections and report["method"] == "tune":
            _child_runs(uri, experiment, stage.storage, rid, eid, selections,
                        variant_fingerprint(stage.cfg))
        _log_submission(uri, rid, submission)
    return rid
