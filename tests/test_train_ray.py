"""Ray Train: DDP, resume equality, failures and half-written checkpoints, MLflow contents,
cluster settings (CPU, local Ray)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port
from vspw_ray.checkpoints import (
    best_checkpoint,
    is_complete,
    list_checkpoints,
    read_state,
    write_checkpoint,
)
from vspw_ray.config import ConfigError, load_config
from vspw_ray.storage import check_cluster_settings
from vspw_ray.train.driver import train_variant
from vspw_ray.train.ray_train import CHECKPOINT_FILE, PAUSE_ENV, load_training_state

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "tiny_synth.yaml"


def _overrides(root, storage, iters=12, workers=1):
    return [f"data.root={root}", f"storage.path={storage}", f"train.iters={iters}",
            "train.val_interval=4", "train.log_interval=2", f"train.num_workers={workers}",
            f"train.batch_size={2 * workers}", "train.warmup_iters=2", "data.loader_workers=0",
            "data.crop_size=[64,64]", "train.max_failures=0"]


# The Train controller polls workers every 2 s; polling faster registers a reported checkpoint
# sooner, so the kill tests reach their kill sooner.
FAST_POLL_ENV = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
# Ray 2.60 Train v2 rewrites <run folder>/checkpoint_manager_snapshot.json (a private format)
# whenever its controller registers a checkpoint; the folders named under "checkpoint_results"
# are the registered ones. test_ray_internals_these_tests_read_are_as_of_2_60 guards the format.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
PLANTED = "checkpoint_0000-half-written"


def registered_checkpoints(storage: Path, stage: str = "train") -> list[Path]:
    """The complete checkpoint folders Ray Train has registered in any run of ``stage``
    (train, swa) under ``storage``."""
    found = []
    for snapshot in Path(storage).glob(f"{stage}/*/{RAY_SNAPSHOT}"):
        try:
            state = json.loads(snapshot.read_text())
        except (OSError, ValueError):  # not there yet, or being rewritten
            continue
        found += [snapshot.parent / r["checkpoint_dir_name"] for r in state["checkpoint_results"]]
    return [folder for folder in found if is_complete(str(folder))]


def wait_for_registered(storage: Path, alive, what: str, timeout_s: float = 180,
                        stage: str = "train") -> Path:
    """Poll until Ray Train has registered a complete checkpoint; that folder."""
    deadline = time.time() + timeout_s
    while not (found := registered_checkpoints(storage, stage)):
        assert alive() and time.time() < deadline, f"no registered checkpoint before {what}"
        time.sleep(0.1)
    return found[-1]


def plant_half_written(run_dir: Path) -> Path:
    """A checkpoint folder as a lost node leaves it: the completion record and metrics.json
    (scoring best) copied, checkpoint.pt cut off half-way. Ray Train never registered it."""
    folder = run_dir / PLANTED
    write_checkpoint(str(folder), {"iteration": 1, "kind": "train", "model": {"w": torch.ones(256)},
                                   "metrics": {"val_A/miou": 1.0}})
    data = (folder / CHECKPOINT_FILE).read_bytes()
    (folder / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    return folder


def assert_lookups_complete(run_dir: Path) -> None:
    """Every folder the lookups return is complete, checked byte for byte."""
    listed = [folder for folder, _ in list_checkpoints(str(run_dir))]
    assert listed and all(is_complete(folder, verify=True) for folder in listed), listed
    assert best_checkpoint(str(run_dir)) in listed
    assert str(run_dir / PLANTED) not in listed


def assert_no_half_written_left(storage: Path) -> None:
    """The resumed run removed every incomplete folder (the planted one included)."""
    left = [p.name for p in Path(storage).glob("train/*/checkpoint_*/")
            if not is_complete(str(p))]
    assert left == [], f"incomplete checkpoint folders left in storage: {left}"


def _final_weights(storage):
    """The state of the newest complete checkpoint (the lookups skip half-written folders)."""
    listed = [(s["iteration"], folder) for run in Path(storage).glob("train/*")
              for folder, s in list_checkpoints(str(run))]
    return read_state(max(listed)[1])


@pytest.mark.slow(18)
def test_two_worker_ddp_learns_with_identical_replicas_and_tracks_in_mlflow(ray_local, synth_root,
                                                                          tmp_path, monkeypatch):
    import mlflow
    import ray

    from vspw_ray.data.fingerprint import data_fingerprint

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # the driver passes it on
    cfg = load_config(EXPERIMENT, [*_overrides(synth_root, tmp_path / "runs", iters=16, workers=2),
                                   "tracking.system_metrics=true"])
    out = train_variant(cfg, "crop64")
    assert out.metrics["iteration"] == 16
    assert out.metrics["ddp/weight_spread"] == 0.0  # both workers hold identical weights
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["variant_id"] == out.variant_id and run.data.tags["family"] == "upernet"
    assert run.data.tags["data_fingerprint"] == data_fingerprint(synth_root, ("train", "val"))
    assert run.data.params["train.num_workers"] == "2" and run.data.params["data.crop_size"] == "[64, 64]"
    loss = [m.value for m in client.get_metric_history(out.run_id, "train/loss")]
    assert len(loss) == 8 and min(loss[-2:]) < loss[0]  # one point per log interval; it learns
    assert [m.step for m in client.get_metric_history(out.run_id, "val_B/miou")] == [4, 8, 12, 16]
    artifacts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"config.yaml", "per_class_iou_val_A.png", "checkpoints.txt"} <= artifacts
    # system metrics: the driver's, and the one node's from one of its two workers
    system = {k for k in run.data.metrics if k.startswith("system/")}
    node = f"node-{ray.get_runtime_context().get_node_id()[:8]}"
    assert {"system/cpu_utilization_percentage",
            f"system/{node}/cpu_utilization_percentage"} <= system
    assert {k.split("/")[1] for k in system if k.count("/") == 2} == {node}
    steps = [m.step for m in client.get_metric_history(out.run_id,
                                                        f"system/{node}/cpu_utilization_percentage")]
    assert len(set(steps)) == len(steps) > 0  # one monitor on the node, not one per worker
    best = load_training_state(Path(out.best_checkpoint) / CHECKPOINT_FILE)
    assert best["variant_id"] == out.variant_id


@pytest.mark.slow(72)
def test_stopped_run_resumes_to_the_same_weights(ray_local, synth_root, tmp_path):
    """SIGTERM to the training command (what `ray job stop`, `kill` and a Kubernetes pod's end
    send; Ctrl-C takes the same path) mid-run: it says how to resume and exits 130 at once,
    shutting its local Ray down; the re-run resumes from the last registered checkpoint to the
    weights of a run never stopped. (The driver and its local Ray SIGKILLed: the pipeline's and
    the sweep's kill tests.)"""
    from vspw_ray.cli import STOPPED

    cfg = load_config(EXPERIMENT, _overrides(synth_root, tmp_path / "straight", iters=32))
    train_variant(cfg, "crop64", track=False)
    straight = _final_weights(tmp_path / "straight")

    storage = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "vspw_ray", "train", str(EXPERIMENT), "--variant", "crop64",
           "--no-track", *_overrides(synth_root, storage, iters=32)]
    log = tmp_path / "stopped.log"
    with log.open("w") as out:
        # the first run waits after its first checkpoint until it is stopped, so the stop
        # always lands mid-run however slowly the machine trains or registers
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**FAST_POLL_ENV, PAUSE_ENV: "1"})
        registered = wait_for_registered(storage, lambda: proc.poll() is None, "the stop")
        os.kill(proc.pid, signal.SIGTERM)  # the driver only: it stops its local Ray itself
        try:
            rc = proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):  # anything left of its session
                os.killpg(proc.pid, signal.SIGKILL)
    printed = log.read_text()
    assert rc == 130 and STOPPED in printed, printed[-3000:]
    assert "Traceback" not in printed, printed[-3000:]
    assert _final_weights(storage)["iteration"] < 32  # stopped mid-run
    plant_half_written(registered.parent)
    assert_lookups_complete(registered.parent)

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = _final_weights(storage)
    assert resumed["iteration"] == 32
    # resumed once, from the latest checkpoint Ray Train had registered (the newest one on disk
    # may have been written but not yet registered when the driver died)
    assert len(resumed["resumes"]) == 1 and 4 <= resumed["resumes"][0] < 32
    assert_lookups_complete(registered.parent)
    assert_no_half_written_left(storage)
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow(22)
def test_other_data_of_the_same_shape_trains_afresh_under_a_new_id(ray_local, synth_root,
                                                                    tmp_path):
    """The issue's report: a second synthetic set of the same shape, trained with the same
    storage, used to resume the first set's finished run and return its checkpoint. Now it is
    another variant, trained from iteration 0; weights of the first set given with --from are
    recorded as a transfer."""
    from vspw_ray.data.fingerprint import data_fingerprint
    from vspw_ray.data.synth import SynthSpec, synthesize
    from vspw_ray.train.driver import data_tags

    other = tmp_path / "other"
    synthesize(other, SynthSpec(videos=8, frames=12, classes=6, height=64, width=80, seed=4),
               processes=1)
    storage, short = tmp_path / "runs", ["train.val_interval=2"]
    first = train_variant(load_config(EXPERIMENT, _overrides(synth_root, storage, 2) + short),
                          "crop64", track=False)
    second = train_variant(load_config(EXPERIMENT, _overrides(other, storage, 2) + short),
                           "crop64", track=False)
    assert second.variant_id != first.variant_id
    assert Path(second.best_checkpoint).parent.name == second.variant_id
    states = [load_training_state(Path(out.best_checkpoint) / CHECKPOINT_FILE)
              for out in (first, second)]
    assert [s["resumes"] for s in states] == [[], []]  # both trained from iteration 0
    assert [s["iteration"] for s in states] == [2, 2]
    assert [s["data_fingerprint"] for s in states] == [
        data_fingerprint(root, ("train", "val")) for root in (synth_root, other)]
    transfer = load_config(EXPERIMENT, _overrides(other, storage) + [
        f"model.init_checkpoint={first.best_checkpoint}/{CHECKPOINT_FILE}"])
    assert data_tags(transfer) == {"data_fingerprint": states[1]["data_fingerprint"],
                                   "init_data_fingerprint": states[0]["data_fingerprint"],
                                   "transfer": "other data"}


def test_train_from_weights_records_whose_data_they_learnt(synth_root, tmp_path):
    from vspw_ray.config import variant_fingerprint
    from vspw_ray.train.driver import data_tags

    cfg = load_config(EXPERIMENT, [f"data.root={synth_root}"])
    mine = variant_fingerprint(cfg)
    assert data_tags(cfg) == {"data_fingerprint": mine}  # no --from: nothing more
    for name, recorded, transfer in (("same", mine, "same data"), ("old", None, "unknown")):
        state = {"model": {}, "variant_id": "up-1", "iteration": 2,
                 **({"data_fingerprint": recorded} if recorded else {})}
        path = write_checkpoint(str(tmp_path / name), state)
        tags = data_tags(load_config(EXPERIMENT, [f"data.root={synth_root}",
                                                  f"model.init_checkpoint={path}"]))
        assert tags["transfer"] == transfer and tags["init_data_fingerprint"] == (
            recorded or "unknown")


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
    from vspw_ray.resources import check_feasible

    cfg = load_config(EXPERIMENT, ["train.use_gpu=true"])
    with pytest.raises(ValueError, match="GPU"):
        check_feasible(cfg)
    check_feasible(cfg, cluster_yaml=Path(__file__).resolve().parents[1] / "cluster.yaml")


def test_waiting_for_busy_resources_times_out_with_the_setting(ray_local, capsys):
    from vspw_ray.resources import wait_for_resources

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


@pytest.mark.slow(43)
def test_killed_worker_process_restarts_from_the_last_checkpoint(synth_root, tmp_path):
    """SIGKILL the Ray Train worker mid-run; FailureConfig restarts the group from the latest
    checkpoint and the run completes. Its own Ray, in a subprocess."""
    storage = tmp_path / "runs"
    overrides = [o for o in _overrides(synth_root, storage, iters=40) if not o.startswith("train.max_failures")]
    cmd = [sys.executable, "-m", "vspw_ray", "train", str(EXPERIMENT), "--variant", "crop64",
           "--no-track", *overrides, "train.max_failures=2"]
    # the first workers wait after their first checkpoint until killed: the kill always lands
    # mid-run; the restarted workers, resumed, do not wait
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**FAST_POLL_ENV, PAUSE_ENV: "1"})
    try:
        try:
            registered = wait_for_registered(storage, lambda: proc.poll() is None, "the kill")
        except AssertionError:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before the kill:\n{proc.stdout.read()[-4000:]}")
            raise
        plant_half_written(registered.parent)
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
    assert_lookups_complete(registered.parent)
    assert_no_half_written_left(storage)


NODE_LOSS_SCRIPT = r"""
import sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[1])  # the repository, for the test module's helpers
import ray
from ray.cluster_utils import Cluster
from tests.test_train_ray import assert_lookups_complete, plant_half_written, wait_for_registered
from vspw_ray.config import load_config
from vspw_ray.train.driver import train_variant

experiment, storage, port, overrides = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "dashboard_port": port})
node = cluster.add_node(num_cpus=2, resources={"trainer": 1})
ray.init(address=cluster.address)
cfg = load_config(experiment, overrides)
result = {}
thread = threading.Thread(target=lambda: result.update(
    out=train_variant(cfg, "crop64", address=cluster.address, track=False)))
thread.start()
registered = wait_for_registered(storage, thread.is_alive, "the node loss")
cluster.remove_node(node)  # the training node is lost, as a spot node would be
print("NODE REMOVED", flush=True)
plant_half_written(registered.parent)  # what the lost node may have left mid-copy
assert_lookups_complete(registered.parent)
cluster.add_node(num_cpus=2, resources={"trainer": 1})  # the autoscaler's replacement
thread.join(300)
print("FINAL", result["out"].metrics["iteration"], flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow(48)
def test_lost_node_restarts_on_a_replacement(synth_root, tmp_path):
    """A two-node local cluster (ray.cluster_utils, token auth as configured by Ray 2.60);
    the node running the worker is removed once Ray Train has registered a checkpoint; the run
    finishes on a new node from that checkpoint, and the half-written folder the lost node left
    is never returned by a lookup and is deleted on resume."""
    storage = tmp_path / "runs"
    overrides = [o for o in _overrides(synth_root, storage, iters=40) if not o.startswith("train.max_failures")]
    overrides += ["train.max_failures=3", "train.resources_per_worker={trainer: 1}"]
    env = {**FAST_POLL_ENV, "VSPW_RAY_SHARED_MOUNT": str(tmp_path),  # one machine: tmp is shared
           PAUSE_ENV: "1"}  # the first workers wait after a checkpoint until their node is lost
    script = tmp_path / "node_loss.py"
    script.write_text(NODE_LOSS_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(REPO), str(EXPERIMENT), str(storage),
                           str(free_port()), *overrides],
                          capture_output=True, text=True, timeout=420, env=env,
                          start_new_session=True)
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if "Error" in line and "PlacementGroupCleaner" not in line]
    assert done.returncode == 0, "\n".join(errors[-20:]) + output[-1500:]
    assert "NODE REMOVED" in output and "FINAL 40" in output
    final = _final_weights(storage)
    assert final["iteration"] == 40
    assert len(final["resumes"]) == 1 and final["resumes"][0] >= 4, final["resumes"]
    assert_lookups_complete(next(storage.glob("train/*")))
    assert_no_half_written_left(storage)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own .json() on pydantic 2
def test_ray_internals_these_tests_read_are_as_of_2_60(tmp_path):
    """remove_unregistered_checkpoints reads the run folder from Ray's StorageContext (a
    DeveloperAPI) and registered_checkpoints reads the checkpoint manager's snapshot (private):
    both as of Ray 2.60. When this fails, Ray changed them: update ray_train and the helpers
    above."""
    import pyarrow.fs
    import ray.train
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )
    from ray.train.v2._internal.execution.storage import StorageContext

    storage = StorageContext(storage_path=str(tmp_path / "train"), experiment_dir_name="run")
    assert storage.experiment_fs_path == str(tmp_path / "train" / "run")
    assert isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem)
    assert callable(ray.train.get_all_reported_checkpoints)

    run = tmp_path / "train" / "run"
    for name in ("checkpoint_a", "checkpoint_b"):
        write_checkpoint(str(run / name), {"iteration": 4})
    result = _TrainingResultState(checkpoint_dir_name="checkpoint_a", metrics={})
    snapshot = _CheckpointManagerState(  # as CheckpointManager._save_state writes it
        checkpoint_results=[result], checkpoint_report_indices=[0],
        latest_checkpoint_result=result, pending_training_results=[],
        pending_validation_specs=[], current_report_index=1, validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    (run / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).write_text(snapshot.json())
    assert registered_checkpoints(tmp_path) == [run / "checkpoint_a"]
    # quiet_report_dumps lowers the loggers Ray Train's report dump (named by its file) and
    # its "Checkpoint successfully created" line go to
    import ray.train.v2._internal.execution.context as ray_context
    import ray.train.v2._internal.execution.storage as ray_storage

    assert ray_context.logger.name == ray_context.__file__
    assert ray_storage.logger.name == ray_storage.__name__


def test_default_tracking_needs_a_local_storage_path():
    from vspw_ray.tracking import resolve_tracking_uri

    with pytest.raises(ValueError, match="'tracking.uri'"):
        resolve_tracking_uri(None, "s3://bucket/runs")
    assert resolve_tracking_uri("http://mlflow:5000", "s3://bucket/runs") == "http://mlflow:5000"
