"""The stage runtime: which Ray a command joins, errors for dead addresses and untrainable
batches, and the run layout's paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import free_port
from vspw_ray.config import ConfigError, load_config
from vspw_ray.ids import member_for_split, member_key
from vspw_ray.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "tiny_synth.yaml"


@pytest.mark.slow(9)
def test_a_stale_cluster_file_does_not_stop_a_local_run():
    """A killed run leaves Ray's ``ray_current_cluster`` file naming a dead instance; with no
    address, a command starts its own local instance (and says so) instead of failing with
    Ray's ``When connecting to an existing cluster, num_cpus ... must not be provided``."""
    tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a limit
    try:
        ray_dir = Path(tmp) / "ray"
        ray_dir.mkdir()
        (ray_dir / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        code = ("from vspw_ray.runtime import connect_ray; import ray; connect_ray(None); "
                "print('CPUS', int(ray.cluster_resources()['CPU'])); ray.shutdown()")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**env, "RAY_TMPDIR": tmp, "VSPW_RAY_DASHBOARD": "0"},
                             cwd=REPO, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "CPUS 4" in out.stdout or f"CPUS {os.cpu_count()}" in out.stdout
        assert "started a local Ray instance" in out.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_dead_address_is_a_one_line_error_naming_it():
    """In a fresh process (this one may hold the session's Ray instance already)."""
    port = free_port()  # nothing listens there
    code = ("import os, sys\nfrom vspw_ray.runtime import RayConnectionError, connect_ray\n"
            "for address in sys.argv[1:]:\n"
            "    os.environ.pop('RAY_ADDRESS', None)\n"
            "    if address.startswith('env:'):\n"
            "        os.environ['RAY_ADDRESS'], address = address[4:], None\n"
            "    try:\n        connect_ray(address)\n        print('CONNECTED')\n"
            "    except RayConnectionError as err:\n        print('ERROR', err)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code, f"127.0.0.1:{port}",
                          f"env:127.0.0.1:{port}", "head-node"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, out.stdout + out.stderr[-2000:]
    assert lines[0].startswith("ERROR") and f"127.0.0.1:{port}" in lines[0]
    assert "nothing answers" in lines[0]
    assert lines[1].startswith("ERROR") and f"127.0.0.1:{port}" in lines[1]  # from RAY_ADDRESS
    assert lines[2].startswith("ERROR") and "is not HOST:PORT" in lines[2]


def test_cli_reports_a_dead_address_in_one_line(synth_root, tmp_path):
    port = free_port()
    shared = tmp_path / "shared"
    out = subprocess.run(
        [sys.executable, "-m", "vspw_ray", "train", str(EXPERIMENT), "--variant", "crop64",
         "--address", f"127.0.0.1:{port}", "--no-track", f"data.root={synth_root}",
         f"storage.path={shared}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "VSPW_RAY_SHARED_MOUNT": str(shared)})
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_a_batch_of_one_per_worker_is_a_config_error_naming_both_keys(synth_root):
    from vspw_ray.config import resolve_variant
    from vspw_ray.train.driver import check_inputs

    cfg = resolve_variant(load_config(EXPERIMENT, [f"data.root={synth_root}", "train.batch_size=2",
                                                   "train.num_workers=2"]), "crop64")
    with pytest.raises(ConfigError, match=r"train\.batch_size.*train\.num_workers"):
        check_inputs(cfg)
    ok = resolve_variant(load_config(EXPERIMENT, [f"data.root={synth_root}", "train.batch_size=4",
                                                  "train.num_workers=2"]), "crop64")
    check_inputs(ok)  # two images per worker train


def test_run_layout_paths_are_the_same_for_folders_and_uris():
    from vspw_ray.config import InferConfig

    for storage in ("/data/runs", "s3://bucket/prefix", "gs://bucket/p/"):
        layout = RunLayout(storage)
        base = storage.rstrip("/")
        assert layout.train_run("up-1") == f"{base}/train/up-1"
        assert layout.swa_run("up-1-swa-abc") == f"{base}/swa/up-1-swa-abc"
        assert layout.best_configs("sw") == f"{base}/tune/sw/best"
        assert layout.scores == f"{base}/scores"
        assert layout.predictions("k", "val") == f"{base}/predictions/k/val"
        assert layout.submission("e") == f"{base}/submissions/e"
    a = member_key("up-1", 100, InferConfig(scales=(1.0,)), "d0d0d0d0d0d0")
    assert a == member_key("up-1", 100, InferConfig(scales=(1.0,), actors=3, batch_size=4),
                           "d0d0d0d0d0d0")
    assert a != member_key("up-1", 100, InferConfig(scales=(0.5, 1.0)), "d0d0d0d0d0d0")  # TTA
    assert a != member_key("up-1", 200, InferConfig(scales=(1.0,)), "d0d0d0d0d0d0")  # checkpoint
    assert a != member_key("up-1", 100, InferConfig(scales=(1.0,), top_k=4),
                           "d0d0d0d0d0d0")  # other encoding
    other = member_key("up-1", 100, InferConfig(scales=(1.0,)), "e1e1e1e1e1e1")  # other data
    assert other != a and member_for_split(a, "e1e1e1e1e1e1") == other


def test_storage_from_before_fingerprints_is_noted_once_and_new_storage_never(tmp_path, capsys):
    from vspw_ray.runtime import ID_SCHEME_FILE, note_id_scheme

    old = tmp_path / "old"
    (old / "train" / "up-8311fe2d1e").mkdir(parents=True)  # an id of the scheme before
    assert note_id_scheme(RunLayout(str(old)))
    err = capsys.readouterr().err
    assert "stay readable under their old ids" in err and "(train)" in err
    assert not note_id_scheme(RunLayout(str(old)))  # once
    assert json.loads((old / ID_SCHEME_FILE).read_text())["older_outputs"] == ["train"]
    new = tmp_path / "new"
    new.mkdir()
    assert not note_id_scheme(RunLayout(str(new)))
    (new / "train" / "up-1").mkdir(parents=True)  # written under the new scheme
    assert not note_id_scheme(RunLayout(str(new)))
    assert capsys.readouterr().err == ""


def test_restored_environ_puts_back_set_and_unset_keys(monkeypatch):
    from vspw_ray.runtime import restored_environ

    monkeypatch.setenv("VSPW_TEST_SET", "before")
    monkeypatch.delenv("VSPW_TEST_UNSET", raising=False)
    with pytest.raises(RuntimeError), restored_environ("VSPW_TEST_SET", "VSPW_TEST_UNSET"):
        os.environ["VSPW_TEST_SET"] = "inside"
        os.environ["VSPW_TEST_UNSET"] = "inside"
        raise RuntimeError("the block failed")  # restored all the same
    assert os.environ["VSPW_TEST_SET"] == "before" and "VSPW_TEST_UNSET" not in os.environ
    with restored_environ("VSPW_TEST_SET"):
        del os.environ["VSPW_TEST_SET"]
    assert os.environ["VSPW_TEST_SET"] == "before"


@pytest.mark.parametrize("asked, acts", [("SIGINT", True), ("", False)])
def test_a_job_stopped_by_sigint_acts_on_it_even_when_it_inherited_sigint_ignored(asked, acts):
    """A shell without job control starts background commands with SIGINT ignored (a cluster
    started from a script with ``&``), and Ray's job supervisor only unblocks it: a command
    whose job is stopped by SIGINT (``RAY_JOB_STOP_SIGNAL=SIGINT``) installs its handler
    anyway; without that setting an inherited ignore is respected."""
    import signal

    code = ("import signal\nfrom vspw_ray.runtime import _interrupt, stop_on_sigterm\n"
            "stop_on_sigterm()\nprint(signal.getsignal(signal.SIGINT) is _interrupt)")
    env = {**os.environ, "RAY_JOB_STOP_SIGNAL": asked}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(acts)
