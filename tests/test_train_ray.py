"""Ray Train: DDP, resume equality, MLflow contents, cluster settings (CPU, local Ray)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from vspw_ray.config import ConfigError, load_config
from vspw_ray.storage import check_cluster_settings
from vspw_ray.train.driver import train_variant
from vspw_ray.train.ray_train import CHECKPOINT_FILE, load_training_state

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "tiny_synth.yaml"


def _overrides(root, storage, iters=12, workers=1):
    return [f"data.root={root}", f"storage.path={storage}", f"train.iters={iters}",
            "train.val_interval=4", "train.log_interval=2", f"train.num_workers={workers}",
            f"train.batch_size={2 * workers}", "train.warmup_iters=2", "data.loader_workers=0",
            "data.crop_size=[64,64]", "train.max_failures=0"]


# The Train controller polls workers every 2 s, so a checkpoint on disk may not be registered yet
# when a kill lands: poll faster and wait for a third checkpoint before killing.
FAST_POLL_ENV = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
REGISTERED = 3


def _final_weights(storage):
    """The newest readable checkpoint. A killed run can leave a half-copied checkpoint folder
    that Ray Train never registered (and never resumes from): skip those."""
    states = []
    for path in Path(storage).glob(f"train/*/checkpoint_*/{CHECKPOINT_FILE}"):
        try:
            states.append(load_training_state(path))
        except (RuntimeError, EOFError):
            continue
    return max(states, key=lambda s: s["iteration"])


def test_two_worker_ddp_learns_with_identical_replicas_and_tracks_in_mlflow(ray_local, synth_root, tmp_path):
    import mlflow

    cfg = load_config(EXPERIMENT, _overrides(synth_root, tmp_path / "runs", iters=16, workers=2))
    out = train_variant(cfg, "crop64")
    assert out.metrics["iteration"] == 16
    assert out.metrics["ddp/weight_spread"] == 0.0  # both workers hold identical weights
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["variant_id"] == out.variant_id and run.data.tags["family"] == "upernet"
    assert run.data.params["train.num_workers"] == "2" and run.data.params["data.crop_size"] == "[64, 64]"
    loss = [m.value for m in client.get_metric_history(out.run_id, "train/loss")]
    assert len(loss) == 8 and min(loss[-2:]) < loss[0]  # one point per log interval; it learns
    assert [m.step for m in client.get_metric_history(out.run_id, "val_B/miou")] == [4, 8, 12, 16]
    artifacts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"config.yaml", "per_class_iou_val_A.png", "checkpoints.txt"} <= artifacts
    best = load_training_state(Path(out.best_checkpoint) / CHECKPOINT_FILE)
    assert best["variant_id"] == out.variant_id


def test_interrupted_run_resumes_to_the_same_weights(ray_local, synth_root, tmp_path):
    cfg = load_config(EXPERIMENT, _overrides(synth_root, tmp_path / "straight", iters=32))
    train_variant(cfg, "crop64", track=False)
    straight = _final_weights(tmp_path / "straight")

    storage = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "vspw_ray", "train", str(EXPERIMENT), "--variant", "crop64",
           "--no-track", *_overrides(synth_root, storage, iters=32)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=FAST_POLL_ENV)
    deadline = time.time() + 180
    while len(list(storage.glob(f"train/*/checkpoint_*/{CHECKPOINT_FILE}"))) < REGISTERED:
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the kill"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray die mid-run
    proc.wait()
    assert _final_weights(storage)["iteration"] < 32  # killed mid-run

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = _final_weights(storage)
    assert resumed["iteration"] == 32
    # resumed once, from the latest checkpoint Ray Train had registered (the newest one on disk
    # may have been written but not yet registered when the driver died)
    assert len(resumed["resumes"]) == 1 and 4 <= resumed["resumes"][0] < 32
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


def test_cluster_run_with_node_local_settings_fails_up_front(tmp_path):
    cfg = load_config(EXPERIMENT, [f"storage.path={tmp_path}"])
    with pytest.raises(ConfigError, match="'storage.path'.*s3://"):
        check_cluster_settings(cfg, "10.0.0.1:6379")
    cfg = load_config(EXPERIMENT, ["storage.path=s3://bucket/runs"])
    with pytest.raises(ConfigError, match="'tracking.uri'.*tracking server"):
        check_cluster_settings(cfg, "10.0.0.1:6379")
    ok = load_config(EXPERIMENT, ["storage.path=s3://bucket/runs", "tracking.uri=http://mlflow:5000"])
    check_cluster_settings(ok, "10.0.0.1:6379")
    check_cluster_settings(cfg, None)  # local runs keep the embedded defaults


def test_impossible_request_fails_fast_naming_the_resource(ray_local, synth_root, tmp_path):
    cfg = load_config(EXPERIMENT, _overrides(synth_root, tmp_path) + ["train.use_gpu=true"])
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"short of \['GPU'\].*train.use_gpu"):
        train_variant(cfg, "crop64", track=False)
    assert time.monotonic() - start < 30


def test_cluster_yaml_node_types_make_a_request_feasible(ray_local, tmp_path):
    from vspw_ray.train.resources import check_feasible

    cfg = load_config(EXPERIMENT, ["train.use_gpu=true"])
    with pytest.raises(ValueError, match="GPU"):
        check_feasible(cfg)
    check_feasible(cfg, cluster_yaml=Path(__file__).resolve().parents[1] / "cluster.yaml")


def test_waiting_for_busy_resources_times_out_with_the_setting(ray_local, capsys):
    from vspw_ray.train.resources import wait_for_resources

    cfg = load_config(EXPERIMENT, ["train.num_workers=8", "train.batch_size=8",
                                   "train.resource_wait_s=1.5"])
    with pytest.raises(TimeoutError, match="train.resource_wait_s"):
        wait_for_resources(cfg, poll_s=0.2)
    assert "waiting for resources: 8 workers" in capsys.readouterr().err


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (read from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_killed_worker_process_restarts_from_the_last_checkpoint(synth_root, tmp_path):
    """SIGKILL the Ray Train worker mid-run; FailureConfig restarts the group from the latest
    checkpoint and the run completes. Its own Ray, in a subprocess."""
    storage = tmp_path / "runs"
    overrides = [o for o in _overrides(synth_root, storage, iters=40) if not o.startswith("train.max_failures")]
    cmd = [sys.executable, "-m", "vspw_ray", "train", str(EXPERIMENT), "--variant", "crop64",
           "--no-track", *overrides, "train.max_failures=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=FAST_POLL_ENV)
    try:
        deadline = time.time() + 180
        while len(list(storage.glob(f"train/*/checkpoint_*/{CHECKPOINT_FILE}"))) < REGISTERED:
            assert proc.poll() is None and time.time() < deadline, "no checkpoint before the kill"
            time.sleep(0.1)
        workers = [p for p in _descendants(proc.pid) if "RayTrainWorker" in _cmdline(p)]
        assert workers, "no Ray Train worker process found"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    final = _final_weights(storage)
    assert final["iteration"] == 40
    assert len(final["resumes"]) == 1 and final["resumes"][0] >= 4, final["resumes"]


NODE_LOSS_SCRIPT = r"""
import sys, threading, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from vspw_ray.config import load_config
from vspw_ray.train.driver import train_variant

experiment, storage, port, overrides = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "dashboard_port": port})
node = cluster.add_node(num_cpus=2, resources={"trainer": 1})
ray.init(address=cluster.address)
cfg = load_config(experiment, overrides)
result = {}
thread = threading.Thread(target=lambda: result.update(
    out=train_variant(cfg, "crop64", address=cluster.address, track=False)))
thread.start()
deadline = time.time() + 180
while len(list(storage.glob("train/*/checkpoint_*/checkpoint.pt"))) < 3:
    assert time.time() < deadline and thread.is_alive(), "no checkpoint before the node loss"
    time.sleep(0.1)
cluster.remove_node(node)  # the training node is lost, as a spot node would be
print("NODE REMOVED", flush=True)
cluster.add_node(num_cpus=2, resources={"trainer": 1})  # the autoscaler's replacement
thread.join(300)
print("FINAL", result["out"].metrics["iteration"], flush=True)
import torch
states = [torch.load(p, weights_only=False) for p in storage.glob("train/*/checkpoint_*/checkpoint.pt")]
print("RESUMES", max(states, key=lambda s: s["iteration"])["resumes"], flush=True)
ray.shutdown()
cluster.shutdown()
"""


def test_lost_node_restarts_on_a_replacement(synth_root, tmp_path):
    """A two-node local cluster (ray.cluster_utils, token auth as configured by Ray 2.60);
    the node running the worker is removed mid-run; the run finishes on a new node."""
    storage = tmp_path / "runs"
    overrides = [o for o in _overrides(synth_root, storage, iters=40) if not o.startswith("train.max_failures")]
    overrides += ["train.max_failures=3", "train.resources_per_worker={trainer: 1}"]
    env = {**FAST_POLL_ENV, "VSPW_RAY_SHARED_MOUNT": str(tmp_path)}  # one machine: tmp is shared
    script = tmp_path / "node_loss.py"
    script.write_text(NODE_LOSS_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(EXPERIMENT), str(storage),
                           str(free_port()), *overrides],
                          capture_output=True, text=True, timeout=420, env=env,
                          start_new_session=True)
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if "Error" in line and "PlacementGroupCleaner" not in line]
    assert done.returncode == 0, "\n".join(errors[-20:]) + output[-1500:]
    assert "NODE REMOVED" in output and "FINAL 40" in output
    resumes = re.search(r"RESUMES \[(\d+)\]", output)
    assert resumes and int(resumes.group(1)) >= 4, output[-2000:]


def test_default_tracking_needs_a_local_storage_path():
    from vspw_ray.tracking import resolve_tracking_uri

    with pytest.raises(ValueError, match="'tracking.uri'"):
        resolve_tracking_uri(None, "s3://bucket/runs")
    assert resolve_tracking_uri("http://mlflow:5000", "s3://bucket/runs") == "http://mlflow:5000"
