"""One trial of a sweep, as Tune runs it: a small driver that trains the trial's config with a
``TorchTrainer`` and forwards its validation reports to Tune (and through Tune to Optuna)."""

from __future__ import annotations

from typing import Any

from vspw_ray import tracking
from vspw_ray.checkpoints import list_checkpoints
from vspw_ray.config import config_from_dict, to_dict, variant_id
from vspw_ray.runtime import open_stage
from vspw_ray.train.driver import build_trainer
from vspw_ray.tune.space import trial_config
from vspw_ray.tune.sweep import TIME_ATTR, Sweep

__all__ = ["run_trial", "trial_run_name", "finished_result"]


def trial_run_name(number: int, vid: str) -> str:
    """The Train run of Optuna trial ``number``: deterministic, so that a trial interrupted
    with its driver resumes from its own checkpoints."""
    return f"trial_{number:04d}_{vid}"


def run_trial(config: dict, *, base: dict, sweep: Sweep) -> None:
    """One trial: a Ray Train run of the trial's config (a child MLflow run of the sweep's
    when it is tracked), its reports forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = config_from_dict(base)
    number = int(config["optuna_trial"])
    params = {k: v for k, v in config.items() if k != "optuna_trial"}
    trial_cfg = trial_config(cfg, params, iters=cfg.tune.iters)
    vid = variant_id(trial_cfg)
    name = trial_run_name(number, vid)
    if _report_finished(sweep, cfg.tune.metric, number, sweep.trial_run(name), cfg.tune.iters):
        return
    tags = {"sweep_id": sweep.id, "tune_trial_id": ray.tune.get_context().get_trial_id()}
    with open_stage(trial_cfg, "tune-trial", tags, track=sweep.parent_run_id is not None,
                    connect=False, run_name=f"trial_{number:04d}/tune-trial",
                    experiment=sweep.experiment,
                    extra_tags={tracking.PARENT_TAG: sweep.parent_run_id or "",
                                "variant_id": vid, "optuna_trial": str(number)},
                    params={**tracking.flatten(to_dict(trial_cfg)),
                            **{f"search.{k}": str(v) for k, v in params.items()}}) as stage:
        metric = stage.cfg.tune.metric
        trainer = build_trainer(stage.cfg, vid, stage.tracking_uri, stage.run_id,
                                sweep.torch_threads, stage.layout, name=name,
                                storage_path=sweep.trials_path,
                                callbacks=[TuneReportCallback()],
                                # every report reaches Tune's scheduler, which needs the metric
                                preemption_checkpoints=False,
                                best_by=metric if stage.cfg.tune.mode == "max" else None)
        result = trainer.fit()
        if result.error:
            raise result.error


def _report_finished(sweep: Sweep, metric: str, number: int, run_dir: str, iters: int) -> bool:
    """When the study already holds this trial as finished (the driver stopped after telling
    Optuna but before Tune saved that), report the result Optuna saw again instead of
    training: the trial is neither lost nor run twice."""
    import optuna
    import ray.tune

    study = optuna.load_study(study_name=sweep.id, storage=sweep.optuna_url)
    trial = next((t for t in study.trials if t.number == number), None)
    if trial is None or not trial.state.is_finished():
        return False
    ray.tune.report(finished_result(trial, metric, run_dir, sweep.id, iters))
    return True


def finished_result(trial, metric: str, run_dir: str, sweep_id: str,
                    iters: int) -> dict[str, Any]:
    """A finished Optuna trial's last result as Tune saw it: ``metric`` and its iteration
    (Tune's metric check needs both), plus the other metrics of the checkpoint made at that
    iteration when it is still in storage. A COMPLETE trial ran its whole schedule: its
    iteration is ``iters`` (``tune.iters``): its last value is told at completion, not as an
    intermediate value, so its intermediate steps end earlier. A PRUNED trial's is its last
    intermediate step.

    Raises:
        RuntimeError: the study holds the trial as FAIL, or as finished without any value:
            the Tune trial errors too (so the two agree) rather than train again.
    """
    import optuna

    steps = trial.intermediate_values
    if trial.state == optuna.trial.TrialState.FAIL or (not steps and trial.value is None):
        raise RuntimeError(
            f"Optuna trial {trial.number} of sweep {sweep_id} is {trial.state.name} without a "
            f"result to report (it failed before the sweep's driver stopped), and an Optuna "
            f"trial cannot be reopened; its parameters were {trial.params}")
    complete = trial.state == optuna.trial.TrialState.COMPLETE
    last = iters if complete else max(steps, default=0)
    value = trial.value if trial.value is not None else steps[last]
    saved = {s["iteration"]: s["metrics"] for _, s in list_checkpoints(run_dir)}
    return {**saved.get(last, {}), metric: value, TIME_ATTR: last}
