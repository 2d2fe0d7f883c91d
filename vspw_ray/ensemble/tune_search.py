"""``ensemble.method: tune``: Ray Tune + OptunaSearch (seeded TPE) over the K-1 free group
weights and each member's share inside its group, each trial scoring one fit's pixel sample.

The sample is put once into Ray's object store (``tune.with_parameters``); a trial is a function
trainable that fuses and scores it in milliseconds, and actors are reused between trials, so
Tune's own per-trial cost is what is left. The Optuna study lives in the same RDB storage as
``vspw-ray tune`` (``tune.storage``, else ``<storage>/tune/optuna.db``), named after the
ensemble; a search that did not finish is started over (its trials cost milliseconds).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from vspw_ray.config import ConfigError, ExperimentConfig
from vspw_ray.ensemble.core.candidates import Candidate
from vspw_ray.ensemble.core.sample import Hull, PixelSample, hull_miou, normalise_inner, sample_miou
from vspw_ray.ensemble.methods import SearchSpace, Selection, fit_samples, fold_samples, sample_heat
from vspw_ray.runtime import restored_environ, tune_result_loggers
from vspw_ray.selection import TrialRow, ranked

__all__ = ["TuneSetup", "WeightSpace", "weight_space", "optuna_url", "score_trial", "run_tuner",
           "tune_method", "METRIC"]

METRIC = "sample_miou_a"  # a trial's estimate of the fold-A mIoU


@dataclass(frozen=True)
class TuneSetup:
    optuna_url: str  # SQLAlchemy URL of the study storage
    study_name: str
    path: str  # Tune's storage_path (a folder or URI)
    name: str  # Tune's experiment name under it
    concurrency: int


def optuna_url(cfg: ExperimentConfig, layout, address: str | None) -> str:
    """``tune.storage``, else the SQLite file ``vspw-ray tune`` uses beside local runs.

    Raises:
        ConfigError: no ``tune.storage`` on a cluster or with remote storage, where no shared
            SQLite file can live.
    """
    from vspw_ray.storage import filesystem, is_uri

    if cfg.tune.storage:
        return cfg.tune.storage
    if address or is_uri(layout.storage):
        raise ConfigError("config key 'tune.storage': unset (a SQLite file beside local runs) "
                          "cannot hold the ensemble's Optuna study here; set "
                          "tune.storage=postgresql://USER@HOST/optuna (any SQLAlchemy URL)")
    fs, folder = filesystem(layout.tune_root)
    fs.create_dir(folder, recursive=True)
    return f"sqlite:///{layout.optuna_db}"


@dataclass(frozen=True)
class WeightSpace:
    """Tune's parameters and how a trial's values become a fusion: the free groups' weights in
    ``[low, high]`` and, with ``inner`` (``ensemble.inner_weights`` and a group of two or more
    members), a raw share in ``[0, 1]`` per member of each group (``inner:<member key>``),
    normalised inside the group (:func:`vspw_ray.ensemble.core.sample.normalise_inner`). Without
    ``inner`` every member of a group has an equal share and trials score a group sample
    settled over the weight box; with it, a member sample settled over the
    :class:`~vspw_ray.ensemble.core.sample.Hull`."""

    groups: dict[str, list[str]]  # base first
    low: float
    high: float
    inner: bool

    @property
    def free(self) -> list[str]:
        return list(self.groups)[1:]

    @property
    def hull(self) -> Hull:
        sizes = [len(ms) for ms in self.groups.values()]
        bounds = [sum(sizes[:g]) for g in range(len(sizes) + 1)]
        return Hull(tuple(tuple(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])),
                    self.low, self.high)

    def names(self) -> list[str]:
        inner = [f"inner:{m}" for ms in self.groups.values() for m in ms] if self.inner else []
        return self.free + inner

    def distributions(self) -> dict:
        import optuna

        return {n: optuna.distributions.FloatDistribution(
            *((0.0, 1.0) if n.startswith("inner:") else (self.low, self.high)))
            for n in self.names()}

    def _raw(self, params: dict) -> list[list[float]]:
        return [[float(params[f"inner:{m}"]) for m in ms] for ms in self.groups.values()]

    def score(self, sample: PixelSample, params: dict) -> float:
        """The sample's mIoU at a trial's parameters."""
        if not self.inner:
            return sample_miou(sample, [params[n] for n in self.free])
        return hull_miou(sample, self.hull.member_weights(
            [params[n] for n in self.free], self._raw(params)))

    def candidate(self, name: str, params: dict, fit: str) -> Candidate:
        """A trial's fusion; shares equal within every group are left out (group means)."""
        shares = {}
        if self.inner:
            for ms, raw in zip(self.groups.values(), self._raw(params)):
                u = normalise_inner(raw)
                if not np.allclose(u, u[0], rtol=0, atol=1e-12):
                    shares.update(dict(zip(ms, u.tolist())))
        return Candidate(name, "searched", self.groups,
                         {g: float(params[g]) for g in self.free}, shares, fit=fit)

    def start_points(self, limit: int) -> list[dict]:
        """Trials enqueued first: the base group's mean, the seed's equal group weights and,
        with inner shares, each base member alone."""
        inner = {f"inner:{m}": 1.0 for ms in self.groups.values() for m in ms} if self.inner \
            else {}
        one = min(max(1.0, self.low), self.high)
        points = [{**{g: self.low for g in self.free}, **inner},
                  {**{g: one for g in self.free}, **inner}]
        if self.inner:
            base = next(iter(self.groups.values()))
            points += [{**points[0], **{f"inner:{m}": float(m == b) for m in base}}
                       for b in base if len(base) > 1]
        return points[:limit]


FIT_KEY = "__fit__"  # a trial's fit, in its config


def score_trial(config: dict, *, samples: dict, weights: WeightSpace) -> None:
    """One Tune trial: its fit's sample mIoU at the trial's parameters."""
    import ray.tune

    ray.tune.report({METRIC: weights.score(samples[config[FIT_KEY]], config)})


def fit_searcher(searchers: dict, per_fit: int):
    """One Tune search algorithm over several fits: each fit's own ``OptunaSearch`` (its own
    study) suggests ``per_fit`` trials, the fits taking turns, so one Tune experiment (one
    start of Tune's machinery, a few seconds each) serves all of them. Every trial's config
    names its fit under :data:`FIT_KEY`."""
    import pickle

    from ray.tune.search import Searcher

    class FitSearch(Searcher):
        def __init__(self):
            super().__init__(metric=METRIC, mode="max")
            self.count = {fit: 0 for fit in searchers}
            self.owner: dict[str, str] = {}

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True  # every fit's searcher has its space, metric and mode

        def suggest(self, trial_id: str):
            for fit in sorted(self.count, key=self.count.__getitem__):
                if self.count[fit] >= per_fit:
                    continue
                config = searchers[fit].suggest(trial_id)
                if config in (None, Searcher.FINISHED):
                    continue
                self.count[fit] += 1
                self.owner[trial_id] = fit
                return {**config, FIT_KEY: fit}
            done = all(n >= per_fit for n in self.count.values())
            return Searcher.FINISHED if done else None

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            searchers[self.owner[trial_id]].on_trial_complete(trial_id, result, error)

        def save(self, checkpoint_path: str) -> None:
            # Tune saves the searcher with its experiment; an unfinished ensemble search is
            # started over (its trials cost milliseconds), so the counts are all it needs
            with open(checkpoint_path, "wb") as f:
                pickle.dump(self.count, f)

    return FitSearch()


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna logs a line per told trial; a search of milliseconds-long trials is kept quiet."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


# Tune's public switches, read when a Tuner fits: Ctrl-C and SIGTERM stop the ensemble's search
# outright (KeyboardInterrupt, the command's "stopped" path) instead of through Tune's graceful
# stop, which returns the trials finished so far as if the search were complete (an unfinished
# search is started over anyway: _fresh_study); and Tune's legacy output engine, in which
# ``verbose=0`` is silent (the new engine prints its experiment table and paths at every level)
_QUIET_TUNE_ENV = {"TUNE_DISABLE_SIGINT_HANDLER": "1", "RAY_AIR_NEW_OUTPUT": "0"}


@contextlib.contextmanager
def _quiet_tune():
    """The search's Tuner with :data:`_QUIET_TUNE_ENV` and Tune's end-of-run INFO line (where it
    wrote its state) at WARNING: the search reports its own progress and results."""
    tune_log = logging.getLogger("ray.tune.tune")
    level = tune_log.level
    with restored_environ(*_QUIET_TUNE_ENV):
        os.environ.update(_QUIET_TUNE_ENV)
        tune_log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            tune_log.setLevel(level)


def _fresh_study(url: str, study: str) -> None:
    """Drop a study left by a search that did not finish (the finished one is never rerun)."""
    import optuna

    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=study, storage=url)
        print(f"started the Optuna study '{study}' over (left unfinished)", flush=True)


def run_tuner(samples: dict[str, PixelSample], weights: WeightSpace, num_samples: int,
              seed: int, setup: TuneSetup) -> dict[str, list[TrialRow]]:
    """One Tune experiment for every fit of ``samples`` (fit -> the sample it selects on):
    each fit its own Optuna study, ``<study_name>-<fit>``, of ``num_samples`` trials. Returns
    per fit one row per complete Optuna trial (``val_a`` its sample mIoU, ``number`` its
    Optuna number), by number."""
    import optuna
    import ray.tune
    from ray.tune.search.optuna import OptunaSearch

    names = weights.names()
    studies = {fit: f"{setup.study_name}-{fit}" for fit in samples}
    with _quiet_optuna():
        searchers = {}
        for fit, study in studies.items():
            _fresh_study(setup.optuna_url, study)
            searchers[fit] = OptunaSearch(
                space=weights.distributions(), metric=METRIC, mode="max",
                points_to_evaluate=weights.start_points(num_samples),
                sampler=optuna.samplers.TPESampler(seed=seed), study_name=study,
                storage=optuna.storages.RDBStorage(setup.optuna_url))
        tuner = ray.tune.Tuner(
            ray.tune.with_parameters(score_trial, samples=dict(samples), weights=weights),
            tune_config=ray.tune.TuneConfig(search_alg=fit_searcher(searchers, num_samples),
                                            num_samples=num_samples * len(samples),
                                            max_concurrent_trials=setup.concurrency,
                                            reuse_actors=True),
            run_config=ray.tune.RunConfig(name=setup.name, storage_path=setup.path,
                                          verbose=0, callbacks=tune_result_loggers()))
        with _quiet_tune():
            results = tuner.fit()
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise failed[0]
    out = {}
    for fit, study in studies.items():
        trials = optuna.load_study(study_name=study, storage=setup.optuna_url).trials
        out[fit] = [TrialRow(number=t.number, tune_trial_id=None, state="complete",
                             params={n: float(t.params[n]) for n in names}, iteration=None,
                             val_a=float(t.value), val_b=None, optuna_state=t.state.name,
                             extra={"fit": fit})
                    for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return out


def weight_space(space: SearchSpace) -> WeightSpace:
    """The parameters of ``space``: inner shares when ``ensemble.inner_weights`` and some group
    has two or more members."""
    e = space.ecfg
    inner = e.inner_weights and any(len(ms) > 1 for ms in space.groups.values())
    return WeightSpace(space.groups, *e.weight_range, inner)


def _samples(space: SearchSpace, weights: WeightSpace, map_fn) -> dict[str, PixelSample]:
    if weights.inner:
        singles = {m: [m] for ms in space.groups.values() for m in ms}
        return fold_samples(space, singles, None, map_fn, hull=weights.hull)
    return fold_samples(space, space.groups, [(weights.low, weights.high)] * len(weights.free),
                        map_fn)


def _tune_fit(space: SearchSpace, weights: WeightSpace, rows: list[TrialRow], sample,
              check, fit: str, stats: dict) -> Selection:
    """One fit's selection from its trials: every trial checked on the other fold's sample,
    the best few as candidates."""
    e = space.ecfg
    rows = [replace(r, val_b=weights.score(check, r.params) if check else None) for r in rows]
    ranked_rows = ranked(rows)
    top, seen = [], set()
    for r in ranked_rows:
        c = weights.candidate(f"tune#{r.number}@{fit}", r.params, fit)
        if c.identity() not in seen and len(top) < e.candidates:
            seen.add(c.identity())
            top.append(c)
    best = ranked_rows[0].params
    heat = sample_heat(sample, weights.free, best, e, weights.score) if weights.free else None
    return Selection("tune", fit, space.groups, {g: best[g] for g in weights.free}, rows, top,
                     heat, {**stats, "trials": len(rows), "sample_pixels": sample.size,
                            "optuna_study": f"{stats['optuna_study']}-{fit}"})


def tune_method(space: SearchSpace, map_fn: Callable, setup: TuneSetup) -> dict[str, Selection]:
    """Sample folds A and B, search every fit's sample in one Tune experiment (a study per
    fit), and check every trial on the other fold's sample."""
    weights = weight_space(space)
    samples = _samples(space, weights, map_fn)
    pairs = {fit: fit_samples(samples, fit) for fit in space.fits}
    start = time.perf_counter()
    rows = run_tuner({fit: pair[0] for fit, pair in pairs.items()}, weights,
                     space.ecfg.num_samples, space.ecfg.seed, setup)
    seconds = time.perf_counter() - start
    trials = sum(len(r) for r in rows.values())
    stats = {"seconds": seconds, "trials_per_s": trials / seconds if seconds else None,
             "concurrency": setup.concurrency, "inner_weights": weights.inner,
             "optuna_study": setup.study_name, "optuna_storage": setup.optuna_url}
    return {fit: _tune_fit(space, weights, rows[fit], *pairs[fit], fit, stats)
            for fit in space.fits}
