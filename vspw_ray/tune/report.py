"""What a finished sweep leaves: the trial table (Tune, Optuna and MLflow joined trial by
trial), the selection-optimism report, Optuna's plots and the best configurations as complete
experiment YAMLs with the full-length schedule."""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vspw_ray import tracking
from vspw_ray.config import ExperimentConfig, config_from_dict, dump_yaml, to_dict, variant_id
from vspw_ray.cost import log_cost, resources_held, sum_child_costs, train_held
from vspw_ray.metrics import VAL_A_MIOU
from vspw_ray.selection import TrialRow, ranked, selection_optimism
from vspw_ray.storage import filesystem
from vspw_ray.tune.space import lookup, trial_config
from vspw_ray.tune.sweep import TIME_ATTR, SearchResult, Sweep, fold_b_metric

__all__ = ["TrialRow", "ranked", "selection_optimism", "format_trials", "finish_sweep",
           "metric_value"]

def metric_value(metrics: Mapping[str, Any] | None, key: str) -> Any:
    """A reported metric by its slash name, whether Tune kept it flat or nested it."""
    if not metrics:
        return None
    return metrics[key] if key in metrics else lookup(metrics, key, sep="/", default=None)


def _pct(v: float | None) -> str:
    return f"{100 * v:.2f}" if v is not None else "-"


def format_trials(rows: Sequence[TrialRow], optimism: Mapping[str, Any], mode: str = "max",
                  metric: str = VAL_A_MIOU) -> str:
    """The trial table, best on ``metric`` (fold A) first, and the selection-optimism lines;
    values in points (x100)."""
    rank_a = {r.number: i + 1 for i, r in enumerate(ranked(rows, mode, "A"))}
    rank_b = {r.number: i + 1 for i, r in enumerate(ranked(rows, mode, "B"))}
    lines = [f"{'#':>4} {'state':<9} {'iter':>6} {'val_A':>7} {'val_B':>7} {'rankA':>5} "
             f"{'rankB':>5}  params"]
    for r in sorted(rows, key=lambda r: (rank_a.get(r.number, 10**6), r.number)):
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(r.params.items()))
        lines.append(f"{r.number:>4} {r.state:<9} {r.iteration or '-':>6} {_pct(r.val_a):>7} "
                     f"{_pct(r.val_b):>7} {rank_a.get(r.number, '-'):>5} "
                     f"{rank_b.get(r.number, '-'):>5}  {params}")
    lines.append("")
    lines.append(f"selection optimism ({metric} x100, ranked on fold A, checked on fold B "
                 f"{fold_b_metric(metric) or '(none)'}):")
    if "lead_a" in optimism:
        lines.append(
            f"  best trial #{optimism['best']} leads runner-up #{optimism['runner_up']} by "
            f"{100 * optimism['lead_a']:+.2f} on A and {100 * optimism['lead_b']:+.2f} on B "
            f"(rank {optimism['best_rank_on_b']} on B): {optimism['verdict']}")
        lines.append(f"  its A-B gap exceeds the trials' mean gap by "
                     f"{100 * optimism['excess_gap']:+.2f}" + (
                         f"; Spearman(A, B) over complete trials = {optimism['spearman_a_b']:.2f}"
                         if optimism.get("spearman_a_b") is not None else ""))
    else:
        lines.append(f"  {optimism['verdict']}")
    lines.append(f"  note: {optimism['caveat']}")
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plots(study, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    paths = []
    for name, plot in (("optuna_history.png", ovm.plot_optimization_history),
                       ("optuna_param_importances.png", ovm.plot_param_importances)):
        try:
            ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:  # too few trials
            (folder / name.replace(".png", ".txt")).write_text(f"not drawn: {err}\n")
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
        fig.set_size_inches(7, 4)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        paths.append(folder / name)
    return paths


def _rows(cfg: ExperimentConfig, grid, study) -> list[TrialRow]:
    """One row per Tune trial that reported, joined with its Optuna trial by number."""

    metric, other = cfg.tune.metric, fold_b_metric(cfg.tune.metric)
    ot = {t.number: t for t in study.trials}
    rows = []
    for result in grid:
        config = dict(result.config or {})
        if "optuna_trial" not in config:  # errored before its first report: no config kept
            continue
        number = int(config.pop("optuna_trial"))
        it = metric_value(result.metrics, TIME_ATTR)
        if result.error is not None:
            state = "error"
        elif it is not None and int(it) >= cfg.tune.iters:
            state = "complete"
        else:
            state = "pruned"
        trial = ot.get(number)
        rows.append(TrialRow(
            number=number, tune_trial_id=metric_value(result.metrics, "trial_id"), state=state,
            params=config, iteration=int(it) if it is not None else None,
            val_a=metric_value(result.metrics, metric),
            val_b=metric_value(result.metrics, other) if other else None,
            optuna_state=trial.state.name if trial else "MISSING",
            extra={"trial_s": metric_value(result.metrics, "time_total_s"),
                   "worker_s": metric_value(result.metrics, "time/worker_s")},
            variant_id=variant_id(trial_config(cfg, config, iters=cfg.tune.iters))))
    return sorted(rows, key=lambda r: r.number)


def _fail_lost_trials(study, rows: Sequence[TrialRow]) -> None:
    """Tell FAIL the study trials still running once the sweep has finished: asked for by a
    driver that was killed before Tune recorded them, and adopted by no later trial. (Never
    called for an interrupted sweep, whose running trials resume.)"""
    import optuna

    seen = {r.number for r in rows}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.number not in seen:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            study.set_user_attr(f"lost_trial_{trial.number}", "asked before a killed driver "
                                "saved the Tune state; never run")


def _finish_child_runs(cfg: ExperimentConfig, rows: Sequence[TrialRow],
                       sweep: Sweep) -> list[TrialRow]:
    """Set each trial's MLflow run to its outcome (FINISHED, KILLED when pruned, FAILED), log
    its cost (Tune's ``time_total_s`` of the trial x its workers and driver) and add its run
    id to the row."""

    if not sweep.parent_run_id:
        return list(rows)
    held = train_held(cfg.train) + resources_held(dict(cfg.tune.driver_resources))
    out = []
    for row in rows:
        tags = {"sweep_id": sweep.id, "tune_trial_id": row.tune_trial_id}
        run_id = tracking.find_run(sweep.tracking_uri, sweep.experiment, tags, unfinished=False)
        if run_id:
            status = {"complete": "FINISHED", "pruned": "KILLED"}.get(row.state, "FAILED")
            tracking.finish_run(sweep.tracking_uri, run_id, status,
                                {"outcome": row.state, "optuna_state": row.optuna_state})
            if isinstance(row.extra.get("trial_s"), (int, float)):  # a total: set, not added
                log_cost(sweep.tracking_uri, run_id, held, row.extra["trial_s"],
                         accumulate=False)
        out.append(replace(row, run_id=run_id))
    return out


def _write_best(cfg: ExperimentConfig, rows: Sequence[TrialRow], folder: Path,
                dest: str) -> dict[str, Path]:
    """The best ``tune.top_k`` trials as complete experiment YAMLs with the full-length
    schedule, written into ``folder``; keyed by where they go under ``dest``."""

    metric, other = cfg.tune.metric, fold_b_metric(cfg.tune.metric)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for rank, row in enumerate(ranked(rows, cfg.tune.mode)[: cfg.tune.top_k], 1):
        name = f"{cfg.name}_best{rank}"
        full = config_from_dict({**to_dict(trial_config(cfg, row.params)), "name": name})
        target = "/".join((dest, f"{name}.yaml"))
        on_b = f", {other} {_pct(row.val_b)}" if other else ""
        header = (f"# Best {rank} of the sweep on fold A of val: trial #{row.number}, {metric} "
                  f"{_pct(row.val_a)}{on_b} after {row.iteration} iterations.\n"
                  f"# Train with: vspw-ray train {target}\n")
        (folder / f"{name}.yaml").write_text(header + dump_yaml(full))
        out[target] = folder / f"{name}.yaml"
    return out


def _write_csv(rows: Sequence[TrialRow], path: Path, metric: str) -> None:
    keys = sorted({k for r in rows for k in r.params})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["optuna_trial", "tune_trial_id", "state", "optuna_state", "iteration",
                         metric, fold_b_metric(metric) or "fold_B", "variant_id",
                         "mlflow_run_id", "trial_s", "worker_s", *keys])
        for r in rows:
            writer.writerow([r.number, r.tune_trial_id, r.state, r.optuna_state, r.iteration,
                             r.val_a, r.val_b, r.variant_id, r.run_id, r.extra.get("trial_s"),
                             r.extra.get("worker_s"),
                             *[json.dumps(r.params[k]) if k in r.params else "" for k in keys]])


def _upload(files: Mapping[str, Path]) -> None:
    """Copy local files to their places in storage (a folder or an ``s3://``/``gs://`` URI)."""

    for target, local in files.items():
        fs, inner = filesystem(target)
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(inner) as f:
            f.write(local.read_bytes())


def finish_sweep(cfg: ExperimentConfig, grid, sweep: Sweep) -> SearchResult:
    """Join Tune's results, the Optuna study and the MLflow runs of a finished sweep; write
    the report into the sweep folder and the best configurations into its ``best/`` folder
    (both in storage, local or remote), and log them to the sweep's MLflow run."""
    import optuna

    study = optuna.load_study(study_name=sweep.id, storage=sweep.optuna_url)
    rows = _rows(cfg, grid, study)
    _fail_lost_trials(study, rows)
    rows = _finish_child_runs(cfg, rows, sweep)
    optimism = selection_optimism(rows, cfg.tune.mode)
    summary = format_trials(rows, optimism, cfg.tune.mode, cfg.tune.metric)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        best = _write_best(cfg, rows, folder / "best", sweep.layout.best_configs(sweep.id))
        summary += "\n\nbest configurations (full-length schedule):\n" + "\n".join(
            f"  {p}" for p in best)
        _write_csv(rows, folder / "trials.csv", cfg.tune.metric)
        (folder / "summary.txt").write_text(summary + "\n")
        (folder / "selection_optimism.json").write_text(json.dumps(optimism, indent=1))
        _plots(study, folder)
        report = {"/".join((sweep.path, f.name)): f for f in sorted(folder.iterdir())
                  if f.is_file()}
        _upload({**report, **best})
        if sweep.parent_run_id:
            _log_to_parent(cfg, sweep, rows, optimism, list(report.values()), list(best.values()))
    return SearchResult(sweep.id, sweep.path, sweep.id, sweep.optuna_url, rows, list(best),
                        summary, sweep.parent_run_id)


def _log_to_parent(cfg: ExperimentConfig, sweep: Sweep, rows: Sequence[TrialRow],
                   optimism: Mapping[str, Any], report: Sequence[Path],
                   best: Sequence[Path]) -> None:
    """The report files, the best configurations and the sweep's numbers on its MLflow run."""

    uri, rid = sweep.tracking_uri, sweep.parent_run_id
    for f in report:
        tracking.log_artifact(uri, rid, f)
    for f in best:
        tracking.log_artifact(uri, rid, f, "best_configs")
    numbers = {k: v for k, v in optimism.items()
               if k in ("lead_a", "lead_b", "excess_gap", "spearman_a_b") and v is not None}
    done = ranked(rows, cfg.tune.mode)
    if done:
        other = fold_b_metric(cfg.tune.metric)
        numbers[f"best/{cfg.tune.metric}"] = done[0].val_a
        if other:
            numbers[f"best/{other}"] = done[0].val_b
    numbers.update(trials_complete=sum(r.state == "complete" for r in rows),
                   trials_pruned=sum(r.state == "pruned" for r in rows),
                   trials_error=sum(r.state == "error" for r in rows))
    tracking.log_metrics(uri, rid, numbers, 0)

    sum_child_costs(uri, rid)  # the trials' resources, summed on the sweep's run
