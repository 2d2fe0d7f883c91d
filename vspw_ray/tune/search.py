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
  ones resume) and the study, after a Ctrl-C (Tune saves its state and the command ends with
  :class:`SweepInterrupted`; no trial is told FAIL) as after a killed driver.
* MLflow: a parent run for the sweep, a child run per trial, sweep artifacts (Optuna's plots,
  the table of all trials, the selection-optimism report, the best configurations).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from vspw_ray import ids
from vspw_ray.config import (
    ConfigError,
    ExperimentConfig,
    SearchParam,
    config_from_dict,
    to_dict,
    variant_fingerprint,
    weight_settings,
)
from vspw_ray.layout import RunLayout
from vspw_ray.resources import check_feasible
from vspw_ray.runtime import (
    open_stage,
    prepare_config,
    quiet_ray_libraries,
    resolve_address,
    tune_result_loggers,
)
from vspw_ray.storage import filesystem, is_uri
from vspw_ray.tune.report import finish_sweep
from vspw_ray.tune.space import (
    has_compound_choices,
    optuna_choice,
    sample,
    validate_space,
)
from vspw_ray.tune.sweep import TIME_ATTR, SearchResult, Sweep, SweepInterrupted
from vspw_ray.tune.trial import run_trial

__all__ = ["SearchResult", "Sweep", "SweepInterrupted", "run_search", "run_trial", "sweep_id",
           "max_concurrent", "enqueue_points", "DefineByRun", "PruneAwareOptunaSearch",
           "TIME_ATTR"]

log = logging.getLogger("vspw_ray.tune")


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
    trial stopped before ``max_t`` as PRUNED, so TPE does not treat its early value as final.

    It relies on private names of Ray's ``OptunaSearch`` and of Optuna, checked by
    ``tests/test_optuna_internals.py`` against the versions pyproject pins (``ray<2.61``):
    * ``OptunaSearch._ot_trials`` (Tune trial id -> ``optuna.Trial``), ``._ot_study``
      (``optuna.Study``), ``._completed_trials`` (set of Tune trial ids), ``._space`` (the
      define-by-run callable); ``save``/``restore`` pickling ``__dict__`` (so ``_max_t``
      survives a restore); ``on_trial_complete`` telling COMPLETE with the metric, PRUNED
      without it, FAIL on error.
    * Optuna: ``Study._storage.get_trial(trial_id)`` (a ``FrozenTrial``),
      ``FrozenTrial._trial_id`` and ``Trial._trial_id`` (the storage's id, not the number),
      ``optuna.trial.Trial(study, trial_id)`` (a handle on a trial already asked for).
    """

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
    model, loss, train and tune sections, runtime-only keys left out, and the fingerprint of
    the training and val data) -> the same sweep, which a re-run resumes."""
    identity = {"name": cfg.name, **weight_settings(cfg), "tune": to_dict(cfg.tune),
                "data_fingerprint": variant_fingerprint(cfg)}
    return ids.sweep_id(cfg.name, identity)


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


def _check_optuna_storage(cfg: ExperimentConfig, storage: str, address: str | None) -> None:
    """Refuse, before anything starts, a default SQLite study where it cannot work."""

    if cfg.tune.storage:
        return
    if address:
        raise ConfigError(
            "config key 'tune.storage': unset (a SQLite file beside the runs) cannot be shared "
            "by the trials of a cluster; set tune.storage=postgresql://USER@HOST/optuna (any "
            "SQLAlchemy URL of a database every node reaches)")
    if is_uri(storage):
        raise ConfigError(f"config key 'tune.storage': storage.path is {storage}, where no "
                          f"SQLite file can live; set tune.storage to a database URL")


def _optuna_url(cfg: ExperimentConfig, layout: RunLayout) -> str:
    """``tune.storage``, else a SQLite file in the layout's tune folder (local storage)."""

    if cfg.tune.storage:
        return cfg.tune.storage
    fs, folder = filesystem(layout.tune_root)  # local: checked by _check_optuna_storage
    fs.create_dir(folder, recursive=True)
    return f"sqlite:///{layout.optuna_db}"


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
               torch_threads: int = 1, parent_run: str | None = None) -> SearchResult:
    """Run (or resume) the sweep of ``cfg.tune`` and write its report and best configs; its
    MLflow run is a child of ``parent_run`` when given (the pipeline's), its trials its own.

    Raises:
        SweepInterrupted: Ctrl-C (SIGINT) stopped the sweep before every trial finished; its
            Tune state and study are saved, and running the same command resumes it.
    """
    import ray

    if cfg.variants:
        cfg = config_from_dict({**to_dict(cfg), "variants": []})  # the search replaces them
    params = validate_space(cfg)
    enqueue_points(cfg, params)  # fail on a bad point before anything starts
    _check_optuna_storage(cfg, cfg.storage.path, resolve_address(address))
    sid = sweep_id(prepare_config(cfg))
    try:
        with open_stage(cfg, "tune", {"sweep_id": sid}, address=address, track=track,
                        run_name=f"{cfg.name}/tune", parent=parent_run) as stage:
            check_feasible(stage.cfg)
            sweep = Sweep(id=sid, storage=stage.storage,
                          optuna_url=_optuna_url(stage.cfg, stage.layout),
                          tracking_uri=stage.tracking_uri, experiment=stage.experiment,
                          parent_run_id=stage.run_id, torch_threads=torch_threads)
            concurrent, why = max_concurrent(stage.cfg, ray.cluster_resources())
            print(f"sweep {sid}: {cfg.tune.num_samples} trials of {cfg.tune.iters} iterations, "
                  f"up to {concurrent} at once ({why}); Optuna study '{sid}' in "
                  f"{sweep.optuna_url}", flush=True)
            grid = _tuner(stage.cfg, params, sweep, concurrent).fit()
            _check_finished(stage.cfg, grid, sweep)
            return finish_sweep(stage.cfg, grid, sweep)
    except KeyboardInterrupt:  # a Ctrl-C outside Tune's loop, or a second one inside it
        raise SweepInterrupted(f"sweep {sid} was interrupted; running the same command again "
                               f"resumes it") from None


def _tuner(cfg: ExperimentConfig, params: list[SearchParam], sweep: Sweep, concurrent: int):
    """The sweep's Tuner: restored from its experiment folder when one exists (finished trials
    kept, unfinished and errored ones resumed), else new."""
    import ray.tune

    quiet_ray_libraries()  # no TensorBoard files or hint; CSV and JSON through the callbacks
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, base=to_dict(cfg), sweep=sweep),
        dict(cfg.tune.driver_resources))
    if ray.tune.Tuner.can_restore(sweep.path):
        print(f"resuming sweep {sweep.id} from {sweep.path}", flush=True)
        return ray.tune.Tuner.restore(sweep.path, trainable=trainable, resume_unfinished=True,
                                      resume_errored=True)
    import optuna
    from ray.tune.schedulers import ASHAScheduler

    _enqueue(cfg, params, sweep.id, sweep.optuna_url)
    tc = cfg.tune
    searcher = PruneAwareOptunaSearch(
        space=DefineByRun(params, to_dict(cfg)), metric=tc.metric, mode=tc.mode,
        sampler=optuna.samplers.TPESampler(seed=tc.seed), study_name=sweep.id,
        storage=optuna.storages.RDBStorage(sweep.optuna_url), max_t=tc.iters)
    scheduler = ASHAScheduler(time_attr=TIME_ATTR, metric=tc.metric, mode=tc.mode,
                              max_t=tc.iters, grace_period=tc.grace_period,
                              reduction_factor=tc.reduction_factor)
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=tc.num_samples,
                                        max_concurrent_trials=concurrent),
        run_config=ray.tune.RunConfig(name=sweep.id, storage_path=sweep.layout.tune_root,
                                      failure_config=ray.tune.FailureConfig(max_failures=1),
                                      callbacks=tune_result_loggers()))


def _check_finished(cfg: ExperimentConfig, grid, sweep: Sweep) -> None:
    """Raise :class:`SweepInterrupted` when Tuner.fit returned early. On SIGINT Tune saves its
    state (the trials it was running as RUNNING, to resume), ends the loop and returns
    normally, with those trials shown TERMINATED but never told to the searcher. So a trial
    counts as finished when it errored or the study holds it as finished; anything less than
    ``tune.num_samples`` of those is an interrupted sweep, whose running study trials must be
    neither reported nor told FAIL."""
    import optuna

    study = optuna.load_study(study_name=sweep.id, storage=sweep.optuna_url)
    told = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    done = 0
    for result in grid:
        number = (result.config or {}).get("optuna_trial")  # None: it never reported
        done += result.error is not None or (number is not None and int(number) in told)
    if done < cfg.tune.num_samples:
        raise SweepInterrupted(
            f"sweep {sweep.id} was interrupted with {done} of {cfg.tune.num_samples} trials "
            f"finished; its state is saved in {sweep.path} and the Optuna study, so running "
            f"the same command again resumes it")
