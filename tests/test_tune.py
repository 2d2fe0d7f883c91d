"""Hyperparameter search: the space, the selection-optimism report, and a real sweep (Ray Tune +
Optuna + Ray Train + MLflow) interrupted and resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_train_ray import EXPERIMENT, FAST_POLL_ENV, _overrides
from vspw_ray.config import ConfigError, config_from_dict, load_config, to_dict
from vspw_ray.tune.report import TrialRow, selection_optimism
from vspw_ray.tune.space import sample, validate_space

SPACE = {
    "data.crop_size": {"type": "categorical", "choices": [[64, 64], [96, 128]]},
    "loss.logit_adjust.enabled": {"type": "categorical", "choices": [False, True]},
    "loss.logit_adjust.tau": {"type": "loguniform", "low": 0.01, "high": 1.0,
                              "when": {"loss.logit_adjust.enabled": True}},
    "loss.ohem.enabled": {"type": "categorical", "choices": [False, True],
                          "when": {"model.family": "upernet"}},
    "loss.ohem.thresh": {"type": "uniform", "low": 0.5, "high": 0.9,
                         "when": {"loss.ohem.enabled": True}},
    "train.lr": {"type": "loguniform", "low": 1e-7, "high": 1e-3},
}


def _cfg(extra_tune=None, **space_changes):
    data = to_dict(load_config(EXPERIMENT, ["loss.logit_adjust.prior=/tmp/prior.json"]))
    data["tune"]["space"] = {**SPACE, **space_changes}
    data["tune"].update(extra_tune or {})
    return config_from_dict(data)


class _FixedTrial:
    """An ``optuna.Trial`` stand-in that returns the first choice / the low end."""

    def __init__(self, picks=None):
        self.picks, self.asked = picks or {}, []

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        return self.picks.get(name, choices[0])

    def suggest_float(self, name, low, high, log=False):
        self.asked.append(name)
        return self.picks.get(name, low)

    def suggest_int(self, name, low, high, step=1):
        self.asked.append(name)
        return low


def test_conditional_parameters_are_sampled_only_when_their_switch_is_on():
    cfg = _cfg()
    order = validate_space(cfg)
    fixed = to_dict(cfg)
    off = sample(_FixedTrial(), order, fixed)
    assert "loss.logit_adjust.tau" not in off and "loss.ohem.thresh" not in off
    assert off["data.crop_size"] == [64, 64]  # lists come back as lists
    on = sample(_FixedTrial({"loss.logit_adjust.enabled": True, "loss.ohem.enabled": True}),
                order, fixed)
    assert on["loss.logit_adjust.tau"] == 0.01 and on["loss.ohem.thresh"] == 0.5
    # OHEM is a UperNet option: not sampled at all for MaskFormer
    mf = sample(_FixedTrial({"loss.ohem.enabled": True}), order,
                {**fixed, "model": {**fixed["model"], "family": "maskformer"}})
    assert "loss.ohem.enabled" not in mf and "loss.ohem.thresh" not in mf


@pytest.mark.parametrize("change, message", [
    ({"train.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "'train.lrr' is not a searchable"),
    ({"train.lr": {"type": "uniform", "low": -1.0, "high": 0.1}}, "tune.space.train.lr.*-1.0"),
    ({"loss.ohem.thresh": {"type": "uniform", "low": 0.5, "high": 0.9,
                           "when": {"loss.ohem.on": True}}}, "'loss.ohem.on' is not a config key"),
    ({"loss.ohem.enabled": {"type": "categorical", "choices": [True],
                            "when": {"loss.ohem.thresh": 0.5}}}, "cycle"),
    ({"loss.logit_adjust.enabled": {"type": "categorical", "choices": [True, False],
                                    "when": {"data.crop_size": [1, 1]}}}, "never sampled"),
])
def test_invalid_search_space_is_named(change, message):
    with pytest.raises(ConfigError, match=message):
        validate_space(_cfg(**change))


def test_logit_adjustment_in_the_space_needs_a_prior():
    data = to_dict(load_config(EXPERIMENT))
    data["loss"]["logit_adjust"]["prior"] = None
    with pytest.raises(ConfigError, match="loss.logit_adjust.prior"):
        validate_space(config_from_dict(data))


def test_selection_optimism_flags_a_lead_that_does_not_hold():
    def row(n, a, b, state="complete"):
        return TrialRow(n, str(n), state, {}, 10, a, b, "COMPLETE")

    holds = selection_optimism([row(0, 0.50, 0.48), row(1, 0.45, 0.44), row(2, 0.40, 0.41)])
    assert holds["best"] == 0 and holds["verdict"] == "holds"
    assert holds["lead_a"] == pytest.approx(0.05) and holds["lead_b"] == pytest.approx(0.04)
    assert holds["excess_gap"] == pytest.approx(0.02 - (0.02 + 0.01 - 0.01) / 3)
    lucky = selection_optimism([row(0, 0.50, 0.40), row(1, 0.45, 0.44),
                                row(2, 0.60, 0.10, "pruned")])  # pruned trials are not ranked
    assert lucky["best"] == 0 and lucky["best_rank_on_b"] == 2
    assert lucky["verdict"].startswith("does not hold")
    assert "cannot detect a shift between val and test" in lucky["caveat"]


# ---------------------------------------------------------------------------------- real sweep

GOOD = [{"data.crop_size": [96, 128], "loss.logit_adjust.enabled": True,
         "loss.logit_adjust.tau": 0.36, "loss.ohem.enabled": False, "train.lr": 2.9e-4},
        {"data.crop_size": [96, 128], "loss.logit_adjust.enabled": False,
         "loss.ohem.enabled": True, "loss.ohem.thresh": 0.85, "train.lr": 2.7e-4}]
# deliberately bad: small crops and a learning rate a thousand times too small
BAD = {"data.crop_size": [64, 64], "loss.logit_adjust.enabled": False,
       "loss.ohem.enabled": False, "train.lr": 2e-7}


def _sweep_yaml(tmp_path, synth_root, storage):
    from vspw_ray.config import dump_yaml
    from vspw_ray.data.stats import class_stats, write_stats

    prior = write_stats(class_stats(synth_root, "train", processes=1), tmp_path / "stats")["prior"]
    cfg = load_config(EXPERIMENT, _overrides(synth_root, storage, iters=200) + [
        f"loss.logit_adjust.prior={prior}", "train.batch_size=2"])
    data = to_dict(cfg)
    data["variants"] = []
    data["tune"].update(num_samples=4, iters=12, grace_period=4, reduction_factor=2, top_k=2,
                        max_concurrent_trials=1, space=SPACE, enqueue=GOOD + [BAD])
    path = tmp_path / "sweep.yaml"
    path.write_text(dump_yaml(config_from_dict(data)))
    return path


def _finished(study_name, url):
    import optuna

    if not Path(url.removeprefix("sqlite:///")).is_file():
        return 0  # not created yet (reading would create it)
    try:
        study = optuna.load_study(study_name=study_name, storage=url)
    except Exception:  # noqa: BLE001 - not created yet, or the schema is being written
        return 0
    return sum(t.state.is_finished() for t in study.trials)


def test_sweep_resumes_and_agrees_across_tune_optuna_and_mlflow(synth_root, tmp_path):
    import mlflow
    import optuna

    from vspw_ray.train.driver import prepare_config
    from vspw_ray.tune.search import sweep_id

    storage = tmp_path / "runs"
    path = _sweep_yaml(tmp_path, synth_root, storage)
    sid = sweep_id(prepare_config(load_config(path)))
    url = f"sqlite:///{storage / 'tune' / 'optuna.db'}"
    cmd = [sys.executable, "-m", "vspw_ray", "tune", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=FAST_POLL_ENV)
    deadline = time.time() + 300
    while _finished(sid, url) < 2:
        assert proc.poll() is None and time.time() < deadline, "no finished trial before the kill"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray die mid-sweep
    proc.wait()
    assert _finished(sid, url) < 4

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=FAST_POLL_ENV)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"resuming sweep {sid}" in rerun.stdout and "selection optimism" in rerun.stdout

    import csv

    folder = storage / "tune" / sid
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert len(rows) == 4  # exactly num_samples trials: none lost, none run twice
    study = optuna.load_study(study_name=sid, storage=url)
    finished = {t.number: t for t in study.trials if t.state.is_finished()
                and t.state != optuna.trial.TrialState.FAIL}
    assert sorted(finished) == sorted(int(r["optuna_trial"]) for r in rows)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    for row in rows:
        trial = finished[int(row["optuna_trial"])]
        params = {k: json.loads(v) for k, v in row.items() if "." in k and v != ""}
        assert set(params) == set(trial.params)  # conditional keys absent alike
        for key, value in params.items():
            expected = trial.params[key]
            if isinstance(expected, float):
                assert value == pytest.approx(expected), key
            else:  # Optuna keeps list choices (crop sizes) as their strings
                assert (str(value) if isinstance(value, list) else value) == expected, key
        if params.get("loss.ohem.enabled") is False:
            assert "loss.ohem.thresh" not in params
        state = {"COMPLETE": "complete", "PRUNED": "pruned"}[trial.state.name]
        assert row["state"] == state
        run = client.get_run(row["mlflow_run_id"])
        assert run.data.tags["optuna_trial"] == row["optuna_trial"]
        assert run.info.status == ("FINISHED" if state == "complete" else "KILLED")
        # the child run logged the value Tune and Optuna saw at that iteration (a stopped trial
        # may have logged a little more before the stop reached its workers)
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_A/miou")}
        assert history[int(row["iteration"])] == pytest.approx(float(row["val_A/miou"]))
        if state == "complete":
            assert trial.value == pytest.approx(float(row["val_A/miou"]))
            assert int(row["iteration"]) == 12
        else:  # stopped by ASHA at a rung, told to Optuna with its intermediate value
            assert int(row["iteration"]) < 12
            assert max(trial.intermediate_values) == int(row["iteration"])
    bad = next(r for r in rows if r["optuna_trial"] == "2")  # the third enqueued point
    assert json.loads(bad["train.lr"]) == pytest.approx(2e-7) and bad["state"] == "pruned"

    parent = client.search_runs([client.get_experiment_by_name("tiny_synth").experiment_id],
                                "tags.stage = 'tune'")[0]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "summary.txt", "optuna_history.png", "selection_optimism.json"} <= artifacts
    best = sorted((folder / "best").glob("*.yaml"))
    assert len(best) == min(2, sum(r["state"] == "complete" for r in rows)) >= 1
    top = load_config(best[0])  # complete, runnable, with the full-length schedule
    assert top.train.iters == 200 and not top.variants
    ranked = sorted((r for r in rows if r["state"] == "complete"),
                    key=lambda r: -float(r["val_A/miou"]))
    assert [top.data.crop_size, top.train.lr] == [
        tuple(json.loads(ranked[0]["data.crop_size"])),
        pytest.approx(float(ranked[0]["train.lr"]))]
