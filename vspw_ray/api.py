"""The public Python API: one entry point per stage, each taking the experiment config
(:func:`load_config`) and returning its stage's result, the same functions the command line
calls. Each name loads its stage on first use, so importing this module stays light.

    from vspw_ray.api import load_config, run_pipeline
    cfg = load_config("experiments/quickstart.yaml", ["train.iters=30"])
    run_pipeline(cfg)

| stage | function | result |
|---|---|---|
| config | ``load_config(path, overrides)``, ``resolve_variant(cfg, name)`` | ``ExperimentConfig`` |
| data | ``check_dataset(root)``, ``class_stats(root)``, ``synthesize(out, spec)`` | reports |
| search | ``run_search(cfg)`` | ``SearchResult`` |
| train | ``train_variant(cfg, variant)`` | ``TrainResult`` |
| swa | ``swa_variant(cfg, variant)`` | ``SwaResult`` |
| infer | ``run_inference(cfg, checkpoint, split)`` | ``InferResult`` |
| evaluate | ``evaluate_predictions(pred_dir, root, split)``, ``evaluate_store(...)`` | figures |
| ensemble | ``run_ensemble(cfg, apply=None)`` | ``EnsembleResult`` |
| pipeline | ``run_pipeline(cfg)``, ``experiment_status(cfg)`` | ``PipelineResult``, status rows |

Every stage also has the same small contract (``STAGES[name]``: ``key``, ``done``, ``run(ctx,
item) -> Record``; see :mod:`vspw_ray.stages`), which the pipeline and the command line use:

    from vspw_ray.api import STAGES, StageContext
    record = STAGES["train"].run(StageContext(cfg), "upernet_crop64")
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "load_config": "vspw_ray.config",
    "resolve_variant": "vspw_ray.config",
    "ExperimentConfig": "vspw_ray.config",
    "check_dataset": "vspw_ray.data.check",
    "class_stats": "vspw_ray.data.stats",
    "synthesize": "vspw_ray.data.synth",
    "SynthSpec": "vspw_ray.data.synth",
    "run_search": "vspw_ray.tune.search",
    "train_variant": "vspw_ray.train.driver",
    "swa_variant": "vspw_ray.train.swa",
    "run_inference": "vspw_ray.infer.job",
    "evaluate_predictions": "vspw_ray.evaluate",
    "evaluate_store": "vspw_ray.evaluate",
    "run_ensemble": "vspw_ray.ensemble.stage",
    "run_pipeline": "vspw_ray.pipeline.run",
    "experiment_status": "vspw_ray.pipeline.status",
    "STAGES": "vspw_ray.stages",
    "StageContext": "vspw_ray.stages",
    "StageRecord": "vspw_ray.stages",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'vspw_ray.api' has no attribute '{name}' "
                             f"(public names: {', '.join(__all__)})")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return __all__
