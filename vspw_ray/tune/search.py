"""`vspw-ray tune`: Ray Tune + OptunaSearch over an experiment's ``tune.space``; each trial is
a Ray Train run.

* Each trial is a function trainable (a small driver with ``tune.driver_resources``) that runs a
  ``TorchTrainer`` of the trial's config with a shortened schedule (``tune.iters``) and forwards
  its validation reports to Tune through ``TuneReportCallback``. The Train run is named
  deterministically (``trial_<optuna number>_<variant_id>``), so a trial interrupted with the
  driver resumes from its own checkpoints.
* ``OptunaSearch`` (TPE, seeded) keeps its study in an RDB storage (SQLite beside the runs by
  default; ``tune.storage`` takes any SQLAlchemy URL), so ``optuna.load_study`` and
  optuna-dashboard can open it. Trials that ASHA stops early are told to Optuna as PRUNED with
  their intermediate values (Tune would report them COMPLETE with an early value).
* ASHA uses the reported training ``iteration`` as its time attribute.
* Re-running the same command restores the Tune experiment (finished trials are kept, unfinished
  ones resume) and the study.
* MLflow: a parent run for the sweep, a child run per trial, sweep artifacts (Optuna's plots,
  the table of all trials, the selection-optimism report, the best configurations).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from vspw_ray.config import ConfigError, ExperimentConfig, SearchParam, config_from_dict, to_dict
from vspw_ray.tune.space import (has_compound_choices, optuna_choice, sample, trial_config,
                                 validate_space)

__all__ = ["SearchResult", "run_search", "run_trial", "sweep_id", "max_concurrent",
           "TIME_ATTR"]

log = logging.getLogger("vspw_ray.tune")
TIME_ATTR = "iteration"  # ASHA's clock: training iterations, not Tune's count of reports


class DefineByRun:
    """The Optuna define-by-run space (a picklable callable: Tune saves the searcher)."""

    def __init__(self, params: list[SearchParam], fixed: dict):
        self.params, self.fixed = params, fixed

    def __call__(self, trial) -> dict[str, Any]:
        values = sample(trial, self.params, self.fixed)
        # returned values replace the captured ones in the trial's config (crop sizes are
        # lists, which Optuna stores as strings) and the Optuna number names the trial
        return {**values, "optuna_trial": trial.number}


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that reports intermediate values at the training iteration and tells a
    trial stopped before ``max_t`` as PRUNED, so TPE does not treat its early value as final."""

    def __init__(self, *args, max_t: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._max_t = max_t

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id not in self._ot_trials and self._space:
            orphan = self._orphan()
            if orphan is not None:
                self._ot_trials[trial_id] = orphan
        return super().suggest(trial_id)

    def _orphan(self):
        """A trial the study holds as running that no Tune trial owns: asked for by a driver
        that died before Tune saved its state. The next new Tune trial adopts it (same number,
        same parameters), so nothing asked for is lost."""
        import optuna

        owned = {t._trial_id for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False,
                                                states=(optuna.trial.TrialState.RUNNING,)):
            if frozen._trial_id not in owned:
                return optuna.trial.Trial(self._ot_study, frozen._trial_id)
        return None

    def _finished_in_study(self, trial_id: str) -> bool:
        """A trial the study already holds as finished: told before the driver died, but after
        Tune last saved its state. Its re-run only re-reports; nothing more is told."""
        trial = self._ot_trials[trial_id]
        state = self._ot_study._storage.get_trial(trial._trial_id).state
        if state.is_finished():
            self._completed_trials.add(trial_id)
            return True
        return False

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if (trial_id in self._completed_trials or self.metric not in result
                or self._finished_in_study(trial_id)):
            return
        self._ot_trials[trial_id].report(result[self.metric], int(result[TIME_ATTR]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        import optuna

        if trial_id in self._completed_trials or self._finished_in_study(trial_id):
            return
        if (not error and result
                and int(result.get(TIME_ATTR, self._max_t)) < self._max_t):
            trial = self._ot_trials[trial_id]
            step = int(result[TIME_ATTR])
            if self.metric in result:  # the stopping result may not have passed on_trial_result
                trial.report(result[self.metric], step)
            self._ot_study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)


def sweep_id(cfg: ExperimentConfig) -> str:
    """A stable name for the sweep of this experiment: what decides its trials (seed, data,
    model, loss, train and tune sections, runtime-only keys left out) -> the same sweep, which
    a re-run resumes."""
    data = to_dict(cfg)
    identity = {k: data[k] for k in ("name", "seed", "data", "model", "loss", "train", "tune")}
    for key in ("root", "loader_workers"):
        identity["data"].pop(key, None)
    blob = json.dumps(identity, sort_keys=True, default=str)
    return f"{cfg.name}-tune-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Logical resources one trial holds: its driver plus its Train workers."""
    per_worker = dict(cfg.train.resources_per_worker) or {"CPU": 1.0}
    if cfg.train.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    total = {k: float(v) for k, v in cfg.tune.driver_resources.items()}
    for key, value in per_worker.items():
        total[key] = total.get(key, 0.0) + cfg.train.num_workers * float(value)
    return total


def max_concurrent(cfg: ExperimentConfig, cluster: dict[str, float]) -> tuple[int, str]:
    """How many trials fit at once, and why (GPUs / GPUs per trial, else CPUs)."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials, "tune.max_concurrent_trials"
    need = _trial_resources(cfg)
    key = "GPU" if need.get("GPU") else "CPU"
    fits = int(cluster.get(key, 0) // need[key])
    return max(1, fits), f"{cluster.get(key, 0):g} {key}s / {need[key]:g} per trial"


def run_trial(config: dict, *, base: dict, sweep: dict) -> None:
    """One trial: a Ray Train run of the trial's config, its reports forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from vspw_ray import tracking
    from vspw_ray.config import variant_id
    from vspw_ray.train.driver import build_trainer

    cfg = config_from_dict(base)
    number = int(config["optuna_trial"])
    params = {k: v for k, v in config.items() if k != "optuna_trial"}
    trial_cfg = trial_config(cfg, params, iters=cfg.tune.iters)
    vid = variant_id(trial_cfg)
    name = f"trial_{number:04d}_{vid}"
    trial_id = ray.tune.get_context().get_trial_id()
    trials_path = f"{sweep['path']}/trials"
    if _report_finished(sweep, number, f"{trials_path}/{name}"):
        return

    def fit(run_id: str | None) -> None:
        trainer = build_trainer(trial_cfg, vid, sweep["tracking_uri"], run_id,
                                sweep["torch_threads"], sweep["storage"], name=name,
                                storage_path=trials_path,
                                callbacks=[TuneReportCallback()])
        result = trainer.fit()
        if result.error:
            raise result.error

    if not sweep.get("parent_run_id"):
        fit(None)
        return
    tags = {"sweep_id": sweep["id"], "tune_trial_id": trial_id, "stage": "tune-trial"}
    uri, experiment = sweep["tracking_uri"], sweep["experiment"]
    with tracking.open_run(
            uri, experiment, sweep["storage"], run_id=tracking.find_run(uri, experiment, tags),
            run_name=name, tags={**tags, tracking.PARENT_TAG: sweep["parent_run_id"],
                                 "variant_id": vid, "optuna_trial": str(number)},
            params={**tracking.flatten(to_dict(trial_cfg)),
                    **{f"search.{k}": str(v) for k, v in params.items()}}) as rid:
        fit(rid)


def _report_finished(sweep: dict, number: int, run_dir: str) -> bool:
    """When the study already holds this trial as finished (the driver died after telling
    Optuna but before Tune saved that), report the result Optuna saw again instead of
    training: the trial is neither lost nor run twice."""
    import optuna
    import ray.tune

    from vspw_ray.train.checkpoints import list_checkpoints

    study = optuna.load_study(study_name=sweep["id"], storage=sweep["optuna_url"])
    trial = next((t for t in study.trials if t.number == number), None)
    if trial is None or not trial.state.is_finished():
        return False
    last = max(trial.intermediate_values) if trial.intermediate_values else None
    summaries = [s for _, s in list_checkpoints(run_dir)
                 if last is None or s["iteration"] <= last]
    if summaries:
        summary = max(summaries, key=lambda s: s["iteration"])
        ray.tune.report({**summary["metrics"], TIME_ATTR: summary["iteration"]})
    return True


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


def _optuna_storage(cfg: ExperimentConfig, storage: str, address: str | None) -> str:
    if cfg.tune.storage:
        return cfg.tune.storage
    if address:
        raise ConfigError(
            "config key 'tune.storage': unset (a SQLite file beside the runs) cannot be shared "
            "by the trials of a cluster; set tune.storage=postgresql://USER@HOST/optuna (any "
            "SQLAlchemy URL of a database every node reaches)")
    if "://" in storage:
        raise ConfigError(f"config key 'tune.storage': storage.path is {storage}, where no "
                          f"SQLite file can live; set tune.storage to a database URL")
    folder = Path(storage) / "tune"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def _enqueue(cfg: ExperimentConfig, params: list[SearchParam], study_name: str,
             url: str) -> None:
    """Put ``tune.enqueue`` into the study before the first trial is asked for."""
    import optuna

    if not cfg.tune.enqueue:
        return
    study = optuna.create_study(study_name=study_name, storage=url, load_if_exists=True,
                                direction="maximize" if cfg.tune.mode == "max" else "minimize")
    for point in enqueue_points(cfg, params):
        study.enqueue_trial(point, skip_if_exists=True)


def enqueue_points(cfg: ExperimentConfig, params: list[SearchParam]) -> list[dict[str, Any]]:
    """``tune.enqueue`` in Optuna's terms (list choices as their strings), checked against
    the space."""
    by_key = {p.key: p for p in params}
    points = []
    for i, point in enumerate(cfg.tune.enqueue):
        out = {}
        for key, value in point.items():
            p = by_key.get(key)
            where = f"tune.enqueue[{i}].{key}"
            if p is None:
                raise ConfigError(f"config key '{where}': '{key}' is not in tune.space")
            if p.type == "categorical":
                choices = [list(c) if isinstance(c, tuple) else c for c in p.choices]
                value = list(value) if isinstance(value, tuple) else value
                if value not in choices:
                    raise ConfigError(f"config key '{where}': {value!r} is not one of {choices}")
                if has_compound_choices(p):
                    value = optuna_choice(value)
            elif not p.low <= value <= p.high:
                raise ConfigError(f"config key '{where}': {value!r} is outside "
                                  f"[{p.low}, {p.high}]")
            out[key] = value
        points.append(out)
    return points


def run_search(cfg: ExperimentConfig, *, address: str | None = None, track: bool = True,
               torch_threads: int = 1) -> SearchResult:
    """Run (or resume) the sweep of ``cfg.tune`` and write its report and best configs."""
    import optuna
    import ray
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from vspw_ray import tracking
    from vspw_ray.storage import check_cluster_settings, resolve_storage
    from vspw_ray.train.driver import git_commit, connect_and_find_run, prepare_config
    from vspw_ray.train.resources import check_feasible
    from vspw_ray.tune.report import finish_sweep

    if cfg.variants:
        cfg = config_from_dict({**to_dict(cfg), "variants": []})  # the search replaces them
    address = address or os.environ.get("RAY_ADDRESS")
    params = validate_space(cfg)
    enqueue_points(cfg, params)  # fail on a bad point before anything starts
    check_cluster_settings(cfg, address, track=track)
    cfg = prepare_config(cfg)
    storage = resolve_storage(cfg.storage.path)
    optuna_url = _optuna_storage(cfg, storage, address)
    sid = sweep_id(cfg)
    path = f"{storage.rstrip('/')}/tune/{sid}"
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri, storage)
    experiment = cfg.tracking.experiment or cfg.name
    tags = {"sweep_id": sid, "stage": "tune"}

    parent_run = connect_and_find_run(address, uri, experiment, tags, track)
    check_feasible(cfg)
    concurrent, why = max_concurrent(cfg, ray.cluster_resources())
    print(f"sweep {sid}: {cfg.tune.num_samples} trials of {cfg.tune.iters} iterations, up to "
          f"{concurrent} at once ({why}); Optuna study '{sid}' in {optuna_url}", flush=True)

    def fit(parent_run_id: str | None):
        sweep = {"id": sid, "path": path, "storage": storage, "tracking_uri": uri,
                 "optuna_url": optuna_url,
                 "experiment": experiment, "parent_run_id": parent_run_id,
                 "torch_threads": torch_threads}
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(run_trial, base=to_dict(cfg), sweep=sweep),
            dict(cfg.tune.driver_resources))
        if ray.tune.Tuner.can_restore(path):
            print(f"resuming sweep {sid} from {path}", flush=True)
            tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                           resume_errored=True)
        else:
            _enqueue(cfg, params, sid, optuna_url)
            searcher = PruneAwareOptunaSearch(
                space=DefineByRun(params, to_dict(cfg)), metric=cfg.tune.metric,
                mode=cfg.tune.mode, sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed),
                study_name=sid, storage=optuna.storages.RDBStorage(optuna_url),
                max_t=cfg.tune.iters)
            scheduler = ASHAScheduler(time_attr=TIME_ATTR, metric=cfg.tune.metric,
                                      mode=cfg.tune.mode, max_t=cfg.tune.iters,
                                      grace_period=cfg.tune.grace_period,
                                      reduction_factor=cfg.tune.reduction_factor)
            tuner = ray.tune.Tuner(
                trainable,
                tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                                num_samples=cfg.tune.num_samples,
                                                max_concurrent_trials=concurrent),
                run_config=ray.tune.RunConfig(name=sid, storage_path=f"{storage.rstrip('/')}/tune",
                                              failure_config=ray.tune.FailureConfig(max_failures=1)))
        grid = tuner.fit()
        return finish_sweep(cfg, grid, sweep, study_name=sid, optuna_url=optuna_url)

    if not track:
        return fit(None)
    with tracking.open_run(uri, experiment, storage, run_id=parent_run, run_name=sid,
                           tags={**tags, "git_commit": git_commit()},
                           params=tracking.flatten(to_dict(cfg))) as rid:
        return fit(rid)
