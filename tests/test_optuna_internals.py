"""The private names of Ray's ``OptunaSearch`` and of Optuna that ``PruneAwareOptunaSearch``
(vspw_ray/tune/search.py) relies on, checked one by one: a Ray or Optuna release that renames
or changes one fails here, naming it, rather than in the middle of a sweep. No Ray cluster
needed."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import optuna
import pytest
import ray
from optuna.distributions import FloatDistribution
from ray.tune.search.optuna import OptunaSearch

from vspw_ray.config import SearchParam
from vspw_ray.tune.search import DefineByRun, PruneAwareOptunaSearch

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
METRIC, MAX_T = "val_A/miou", 12


def _pin(package: str) -> str:
    """The requirement pyproject gives ``package`` (e.g. ``ray[...]>=2.50,<2.61``)."""
    found = re.search(rf'"({package}(\[[^\]]*\])?[<>=!~][^"]*)"', PYPROJECT.read_text())
    return found.group(1) if found else f"{package} (unpinned)"


def _fail(what: str, name: str) -> str:
    return (f"{name}: {what}. PruneAwareOptunaSearch (vspw_ray/tune/search.py) relies on it; "
            f"installed ray {ray.__version__}, optuna {optuna.__version__}; tested with the "
            f"pins {_pin('ray')} and {_pin('optuna')}. Pin the versions back or port "
            f"PruneAwareOptunaSearch (and this test) to the new internals")


def _attr(obj, owner: str, name: str, kind: type):
    """``obj.name``, failing with ``owner.name`` when it is gone or no longer a ``kind``."""
    assert hasattr(obj, name), _fail("no longer exists", f"{owner}.{name}")
    value = getattr(obj, name)
    assert isinstance(value, kind), _fail(
        f"is a {type(value).__name__}, no longer a {kind.__name__}", f"{owner}.{name}")
    return value


@pytest.fixture()
def searcher(tmp_path):
    space = DefineByRun([SearchParam(type="loguniform", low=1e-7, high=1e-3, key="train.lr")], {})
    return PruneAwareOptunaSearch(
        space=space, metric=METRIC, mode="max", sampler=optuna.samplers.TPESampler(seed=0),
        study_name="pins", storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}"),
        max_t=MAX_T)


def test_ray_optuna_search_keeps_the_private_state_we_use(searcher):
    assert isinstance(searcher, OptunaSearch)
    _attr(searcher, "OptunaSearch", "_ot_trials", dict)
    _attr(searcher, "OptunaSearch", "_completed_trials", set)
    _attr(searcher, "OptunaSearch", "_ot_study", optuna.Study)
    assert _attr(searcher, "OptunaSearch", "_space", DefineByRun) is not None, _fail(
        "no longer holds the define-by-run space", "OptunaSearch._space")
    assert searcher.metric == METRIC, _fail("no longer the metric given", "OptunaSearch.metric")

    config = searcher.suggest("tune-1")
    trial = searcher._ot_trials.get("tune-1")
    assert isinstance(trial, optuna.trial.Trial), _fail(
        "suggest() no longer records the asked optuna.Trial under the Tune trial id",
        "OptunaSearch._ot_trials")
    assert config == {"train.lr": trial.params["train.lr"], "optuna_trial": trial.number}


def test_optuna_private_names_we_use(searcher):
    searcher.suggest("tune-1")
    trial = searcher._ot_trials["tune-1"]
    study = searcher._ot_study
    trial_id = _attr(trial, "optuna.Trial", "_trial_id", int)
    storage = _attr(study, "optuna.Study", "_storage", optuna.storages.BaseStorage)
    frozen = storage.get_trial(trial_id)
    assert isinstance(frozen, optuna.trial.FrozenTrial), _fail(
        "no longer returns a FrozenTrial", "Study._storage.get_trial(trial_id)")
    assert _attr(frozen, "optuna.trial.FrozenTrial", "_trial_id", int) == trial_id
    assert frozen.state == optuna.trial.TrialState.RUNNING
    handle = optuna.trial.Trial(study, frozen._trial_id)
    assert handle.number == trial.number, _fail(
        "no longer a handle on the trial with that storage id", "optuna.trial.Trial(study, id)")


def test_a_stopped_trial_is_told_pruned_and_a_finished_one_complete(searcher):
    study = searcher._ot_study
    searcher.suggest("stopped")
    searcher.suggest("finished")
    searcher.on_trial_result("stopped", {METRIC: 0.2, "iteration": 4})
    # Tune gives the result that made ASHA stop a trial to on_trial_complete only
    searcher.on_trial_complete("stopped", {METRIC: 0.3, "iteration": 8})
    for it in (4, 8, 12):
        searcher.on_trial_result("finished", {METRIC: it / 20, "iteration": it})
    searcher.on_trial_complete("finished", {METRIC: 0.6, "iteration": MAX_T})
    stopped, finished = study.trials
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert stopped.intermediate_values == {4: 0.2, 8: 0.3}  # at the training iteration
    assert finished.state == optuna.trial.TrialState.COMPLETE and finished.value == 0.6
    assert searcher._completed_trials == {"stopped", "finished"}, _fail(
        "no longer records told trials", "OptunaSearch._completed_trials")
    # a trial the study already holds as finished (a resumed driver) is not told again
    searcher.on_trial_result("finished", {METRIC: 0.9, "iteration": MAX_T})
    searcher.on_trial_complete("finished", {METRIC: 0.9, "iteration": MAX_T})
    assert study.trials[1].value == 0.6


def test_an_orphan_study_trial_is_adopted_after_a_restore(searcher, tmp_path):
    searcher.suggest("before")
    path = tmp_path / "searcher.pkl"
    searcher.save(str(path))
    assert "_max_t" in pickle.loads(path.read_bytes()), _fail(
        "save() no longer pickles the searcher's __dict__", "OptunaSearch.save")
    # a driver that died after asking the study for a trial, before Tune saved its state
    orphan = searcher._ot_study.ask({"train.lr": FloatDistribution(1e-7, 1e-3, log=True)})
    restored = PruneAwareOptunaSearch(metric=METRIC, mode="max", max_t=MAX_T)
    restored.restore(str(path))
    assert restored._max_t == MAX_T and set(restored._ot_trials) == {"before"}
    config = restored.suggest("after")
    assert config["optuna_trial"] == orphan.number  # adopted, not a new trial
    assert config["train.lr"] == restored._ot_trials["after"].params["train.lr"]
