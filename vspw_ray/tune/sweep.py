"""What the parts of one sweep share: where it lives and what it reports to (:class:`Sweep`,
shipped to every trial through ``tune.with_parameters``), what a finished sweep returns
(:class:`SearchResult`), and the names of the metrics trials are ranked on."""

from __future__ import annotations

from dataclasses import dataclass

from vspw_ray.errors import UserError
from vspw_ray.layout import RunLayout
from vspw_ray.metrics import fold_metric

__all__ = ["Sweep", "SearchResult", "SweepInterrupted", "TIME_ATTR", "fold_b_metric"]

TIME_ATTR = "iteration"  # ASHA's clock: training iterations, not Tune's count of reports


def fold_b_metric(metric: str) -> str | None:
    """The fold B counterpart of a fold A metric (``val_A/miou`` -> ``val_B/miou``), or None
    for a metric that is not measured on fold A (no selection-optimism check then)."""
    prefix_a, prefix_b = fold_metric("A", ""), fold_metric("B", "")
    return prefix_b + metric[len(prefix_a):] if metric.startswith(prefix_a) else None


class SweepInterrupted(UserError):
    """Tuner.fit stopped before every trial finished (Ctrl-C / SIGINT): nothing is reported and
    no trial is given up; running the same command again resumes the sweep."""


@dataclass(frozen=True)
class Sweep:
    """One sweep's identity and destinations (picklable: every trial gets a copy)."""

    id: str  # the sweep id: the Tune experiment's and the Optuna study's name
    storage: str  # storage.path resolved: an absolute local folder or a URI
    optuna_url: str  # the study's SQLAlchemy URL
    tracking_uri: str | None  # None with --no-track on remote storage
    experiment: str  # the MLflow experiment
    parent_run_id: str | None  # the sweep's MLflow run; None with --no-track
    torch_threads: int  # per Train worker

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.storage)

    @property
    def path(self) -> str:
        """The Tune experiment folder; the report's files are written here too."""
        return self.layout.sweep(self.id)

    @property
    def trials_path(self) -> str:
        """Where the trials' Ray Train runs live (``storage_path`` of their trainers)."""
        return self.layout.sweep_trials(self.id)

    def trial_run(self, name: str) -> str:
        """The folder Ray Train gives the run named ``name`` under :attr:`trials_path`."""
        return "/".join((self.trials_path, name))


@dataclass(frozen=True)
class SearchResult:
    sweep_id: str
    path: str  # the Tune experiment folder
    study_name: str
    optuna_storage: str
    trials: list  # report.TrialRow, by Optuna number
    best_configs: list[str]  # experiment YAMLs with the full-length schedule, best first
    summary: str  # the printed table and selection-optimism report
    run_id: str | None
