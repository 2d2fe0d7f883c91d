"""The command line: bad input is one `error:` line naming the key, file or store member (exit
status 2, no traceback), and commands that need no model start without loading torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vspw_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "tiny_synth.yaml"


def test_unknown_config_key_is_one_error_line(capsys):
    assert main(["config", "show", str(EXPERIMENT), "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown config key 'train.lrr'" in err
    assert "lr" in err.split("known keys here:")[1]  # says what the valid keys are
    assert "Traceback" not in err


def test_missing_store_member_is_one_error_line(tmp_path, capsys, synth_root):
    store = tmp_path / "scores"
    store.mkdir()
    assert main(["evaluate", "--store", str(store), "--variant", "up-nothere", "--root",
                 str(synth_root), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no member 'up-nothere'" in err
    assert "vspw-ray infer" in err  # what to do


def test_config_show_starts_without_torch(tmp_path):
    absent = tmp_path / "not_made"
    code = ("import sys; from vspw_ray.cli import main; rc = main(['config', 'show', "
            f"{str(EXPERIMENT)!r}, 'data.root={absent}']); "
            f"print('TORCH', 'torch' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "name: tiny_synth" in out  # the resolved YAML was printed
    assert out.strip().splitlines()[-1] == "TORCH False 0"
    # without the data the YAML is shown; the ids need the data's fingerprint, and say so
    assert f"# variant ids: not shown: config key 'data.root': dataset root {absent}" in out


def test_config_show_and_data_check_print_ids_and_fingerprints_of_the_data(synth_root, capsys):
    from vspw_ray.config import load_config, resolve_variant, variant_id
    from vspw_ray.data.fingerprint import data_fingerprint

    assert main(["config", "show", str(EXPERIMENT), f"data.root={synth_root}"]) == 0
    cfg = load_config(EXPERIMENT, [f"data.root={synth_root}"])
    assert f"#   crop64: {variant_id(resolve_variant(cfg, 'crop64'))}" in capsys.readouterr().out
    assert main(["data", "check", str(synth_root), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert f"fingerprint {data_fingerprint(synth_root, ('val',))} (class table + val)" in out


def test_closed_pipe_is_not_an_error():
    """`vspw-ray config show ... | head -1`: the reader is gone before the YAML is written."""
    proc = subprocess.Popen([sys.executable, "-m", "vspw_ray", "config", "show", str(EXPERIMENT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    proc.stdout.close()  # long before the interpreter has started and printed anything
    err = proc.stderr.read()
    assert proc.wait() == 0 and "Traceback" not in err, err


@pytest.mark.slow(17)
def test_local_ray_serves_the_state_api_unless_told_not_to():
    """By default the local instance runs the dashboard process that serves Ray's State API
    (Ray Train's helpers poll it; `ray list actors` works against a running job);
    `--no-dashboard` (VSPW_RAY_DASHBOARD=0) leaves it out. The preemption watcher stays off for
    the one local node either way, and the controller polls every 0.5 s unless the user set
    another interval."""
    code = ("import os, ray; from vspw_ray.runtime import connect_ray; connect_ray(None); "
            "from ray.util.state import list_nodes\n"
            "try:\n    state = len(list_nodes(address=os.environ['RAY_API_SERVER_ADDRESS'], timeout=20))\n"
            "except Exception:\n    state = 0\n"
            "seen = ray.get(ray.remote(lambda: os.environ.get('RAY_API_SERVER_ADDRESS')).remote())\n"
            "print('STATE', state, seen == os.environ.get('RAY_API_SERVER_ADDRESS'), "
            "os.environ.get('RAY_TRAIN_ENABLE_PREEMPTION_WATCHER'), "
            "os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S'))")
    unset = ("RAY_ADDRESS", "VSPW_RAY_DASHBOARD", "RAY_API_SERVER_ADDRESS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
             "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    for setting, expect, interval in ((None, True, "0.5"), ("0", False, "3")):
        env = {k: v for k, v in os.environ.items() if k not in unset}
        if setting is not None:
            env["VSPW_RAY_DASHBOARD"] = setting
            env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval  # the user's own setting
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=ROOT, env=env, check=True).stdout
        nodes, same, watcher, polled = out.strip().splitlines()[-1].split()[1:]
        assert (nodes == "1") is expect and watcher == "0" and polled == interval, out
        # Ray's processes ask this instance's own State API (pinned: with two local instances
        # on one machine, Ray's lookup would find either), never another's
        assert same == "True", out


def test_the_local_ray_train_settings_are_variables_ray_passes_to_its_controller():
    """LOCAL_RAY_TRAIN_ENV names Ray Train 2.60's environment variables; if Ray renames or
    stops propagating them, the local settings would silently do nothing."""
    from ray.train.v2._internal import constants

    from vspw_ray.runtime import LOCAL_RAY_TRAIN_ENV

    assert set(LOCAL_RAY_TRAIN_ENV) == {constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR,
                                        constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR}
    assert set(LOCAL_RAY_TRAIN_ENV) <= set(constants.ENV_VARS_TO_PROPAGATE)
