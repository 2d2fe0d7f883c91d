"""``ensemble.method: tune``: Ray Tune + OptunaSearch (seeded TPE) over the K-1 free group
weights, each trial scoring the fold-A pixel sample.

The sample is put once into Ray's object store (``tune.with_parameters``); a trial is a function
trainable that fuses and scores it in milliseconds, and actors are reused between trials, so
Tune's own per-trial cost is what is left. The Optuna study lives in the same RDB storage as
``vspw-ray tune`` (``tune.storage``, else ``<storage>/tune/optuna.db``), named after the
ensemble; a search that did not finish is started over (its trials cost milliseconds).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from vspw_ray.config import ConfigError, ExperimentConfig
from vspw_ray.ensemble.methods import SearchSpace, Selection, fold_samples, sample_heat
from vspw_ray.ensemble.sample import PixelSample, sample_miou
from vspw_ray.tune.report import TrialRow, ranked

__all__ = ["TuneSetup", "optuna_url", "score_trial", "run_tuner", "tune_method", "METRIC"]

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
    return f"sqlite:///{layout.join('tune', 'optuna.db')}"


def score_trial(config: dict, *, sample: PixelSample, names: Sequence[str]) -> None:
    """One Tune trial: the sample's mIoU at the trial's weights."""
    import ray.tune

    ray.tune.report({METRIC: sample_miou(sample, [config[n] for n in names])})


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


def _fresh_study(setup: TuneSetup) -> None:
    """Drop a study left by a search that did not finish (the finished one is never rerun)."""
    import optuna

    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=setup.study_name, storage=setup.optuna_url)
        print(f"started the Optuna study '{setup.study_name}' over (left unfinished)", flush=True)


def run_tuner(sample: PixelSample, names: Sequence[str], low: float, high: float,
              num_samples: int, seed: int, setup: TuneSetup) -> list[TrialRow]:
    """Run the Tune experiment; one row per complete Optuna trial (``val_a`` its sample mIoU,
    ``number`` its Optuna number), by number."""
    import optuna
    import ray.tune
    from ray.tune.search.optuna import OptunaSearch

    with _quiet_optuna():
        _fresh_study(setup)
        searcher = OptunaSearch(
            space={n: optuna.distributions.FloatDistribution(low, high) for n in names},
            metric=METRIC, mode="max", sampler=optuna.samplers.TPESampler(seed=seed),
            study_name=setup.study_name, storage=optuna.storages.RDBStorage(setup.optuna_url))
        tuner = ray.tune.Tuner(
            ray.tune.with_parameters(score_trial, sample=sample, names=tuple(names)),
            tune_config=ray.tune.TuneConfig(search_alg=searcher, num_samples=num_samples,
                                            max_concurrent_trials=setup.concurrency,
                                            reuse_actors=True),
            run_config=ray.tune.RunConfig(name=setup.name, storage_path=setup.path,
                                          verbose=0))
        results = tuner.fit()
    failed = [r.error for r in results if r.error is not None]
    if failed:
        raise failed[0]
    study = optuna.load_study(study_name=setup.study_name, storage=setup.optuna_url)
    return [TrialRow(number=t.number, tune_trial_id=None, state="complete",
                     params={n: float(t.params[n]) for n in names}, iteration=None,
                     val_a=float(t.value), val_b=None, optuna_state=t.state.name)
            for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def tune_method(space: SearchSpace, map_fn: Callable, setup: TuneSetup) -> Selection:
    """Sample folds A and B, search on A with Tune, check every trial on the B sample."""
    e, names = space.ecfg, space.free
    box = [tuple(e.weight_range)] * len(names)
    a, b = fold_samples(space, space.groups, box, map_fn)
    start = time.perf_counter()
    rows = run_tuner(a, names, *e.weight_range, e.num_samples, e.seed, setup)
    seconds = time.perf_counter() - start
    rows = [replace(r, val_b=sample_miou(b, [r.params[n] for n in names])) for r in rows]
    best = ranked(rows)[0]
    return Selection("tune", space.groups, dict(best.params), rows,
                     sample_heat(a, names, best.params, e),
                     {"trials": len(rows), "seconds": seconds,
                      "trials_per_s": len(rows) / seconds if seconds else None,
                      "concurrency": setup.concurrency, "sample_pixels_a": a.size,
                      "sample_pixels_b": b.size, "optuna_study": setup.study_name,
                      "optuna_storage": setup.optuna_url})
