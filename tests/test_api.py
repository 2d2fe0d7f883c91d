"""vspw_ray.api: each stage's entry point by one public name, loaded on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_importing_the_api_loads_no_stage_and_each_name_is_the_stage_function():
    code = ("import sys, vspw_ray.api as api\n"
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules\n"
            "from vspw_ray.train.driver import train_variant\n"
            "assert api.train_variant is train_variant\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_public_name_resolves_and_an_unknown_one_names_them():
    import inspect

    import vspw_ray.api as api

    for name in api.__all__:
        assert name == "STAGES" or callable(getattr(api, name)), name
    stages = ["run_search", "train_variant", "swa_variant", "run_inference", "run_ensemble",
              "run_pipeline", "experiment_status"]
    for name in stages:  # every stage takes the experiment config first
        first = next(iter(inspect.signature(getattr(api, name)).parameters.values()))
        assert first.name == "cfg", name
    with pytest.raises(AttributeError, match="public names: .*run_pipeline"):
        api.train  # noqa: B018
