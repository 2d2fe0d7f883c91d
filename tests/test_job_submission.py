"""Ray job submission to a real multi-node cluster on this machine, started the way a team
starts one: ``ray start --head`` and ``ray start --address`` as separate processes with token
authentication on (``RAY_AUTH_MODE=token`` and a token file on every node, as cluster.yaml
sets them), an ``mlflow server`` with a SQL store, and the pipeline submitted with the job
submission client, its storage on a path declared shared. Then a node lost mid-training.

Every wait polls an observed event (a port answering, a node registered, a job's status, a
checkpoint in storage), never a fixed sleep. Each node and the MLflow server is started in a
session of its own; at the end, also when a test fails, it is stopped and every process left
in its session (the raylet's workers included) is killed by its id.

Addresses: the dashboard (Jobs API) and MLflow listen on 127.0.0.1. Ray 2.60 replaces a loopback
``--node-ip-address`` with this host's own interface address
(``ray._private.services.resolve_ip_for_localhost``), so the nodes and the GCS talk over that
address, which never leaves the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_train_ray import assert_no_half_written_left, registered_checkpoints
from vspw_ray.checkpoints import list_checkpoints, read_state, read_summary
from vspw_ray.cli import STOPPED

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CI_JOB = "experiments/ci_job.yaml"  # relative: the job runs in its uploaded working_dir
EXCLUDES = [".venv", ".git", "runs", "data", "__pycache__", ".pytest_cache", ".ruff_cache",
            "*.egg-info"]
JOB_TIMEOUT_S = 600
STOP_WAIT_S = 60  # RAY_JOB_STOP_WAIT_TIME_S, as deploy/rayjob.yaml sets it

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- processes
def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A process in a session of its own: every process it starts can be found by it."""
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _session(sid: int) -> dict[int, int]:
    """Every process of the session ``sid``, with its start time (``/proc/PID/stat``). A node
    started here is a session of its own, and its raylet's workers stay in it (each in a
    process group of its own: killing the node's group alone would leave them running)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            found[int(stat.parent.name)] = int(fields[19])
    return found


def _kill(procs: dict[int, int], sig: int) -> None:
    """Signal each process that still is the one listed (same pid and start time)."""
    for pid, started in procs.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[19]) == started:
                os.kill(pid, sig)
        except (OSError, ValueError):
            continue


def _stop(procs: list[subprocess.Popen], grace_s: float = 5) -> None:
    """SIGTERM the processes at once (``ray start --block`` stops its node, ``mlflow server``
    its workers), then SIGKILL whatever of their sessions is left after ``grace_s``."""
    members = [_session(p.pid) for p in procs]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc, session in zip(procs, members):
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _kill(session, signal.SIGKILL)
        proc.wait()


def wait_until(check: Callable[[], object], what: str, timeout_s: float,
               alive: Callable[[], str | None] = lambda: None, poll_s: float = 0.25):
    """Poll ``check`` until it returns something true; fail naming ``what`` on timeout, or as
    soon as ``alive`` returns a reason the wait is hopeless."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        reason = alive()
        assert reason is None, f"gave up waiting for {what}: {reason}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
        time.sleep(poll_s)


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


# --------------------------------------------------------------------------- the cluster
@dataclass
class LocalCluster:
    """A head node and worker nodes, each a ``ray start --block`` process group."""

    root: Path  # short, under /tmp: Ray's socket paths must stay under 108 characters
    env: dict[str, str]  # every node's environment: token authentication on
    token: str
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def headers(self) -> dict[str, str]:
        """What Ray's own clients send when RAY_AUTH_MODE=token and the token is found."""
        return {"Authorization": f"Bearer {self.token}"}

    def _ray_start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        cmd = [str(VENV_BIN / "ray"), "start", *args, "--temp-dir", str(self.root / name),
               "--node-ip-address", "127.0.0.1", "--object-store-memory", str(200 * 2**20),
               # the agents' ports given, so the raylet need not wait for them to start and
               # write their ports (it registers within `ray start`'s fixed 30 s even when a
               # loaded 2-core machine takes longer to start the agents)
               "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()),
               "--metrics-export-port", str(free_port()),
               "--min-worker-port", "0", "--max-worker-port", "0",  # any free port
               "--disable-usage-stats", "--block"]
        self.nodes[name] = _start(cmd, self.root / f"{name}.log", env)

    def start_head(self, num_cpus: int, resources: dict[str, float]) -> None:
        self._ray_start("head", ["--head", "--port", str(self.gcs_port),
                                 "--num-cpus", str(num_cpus),
                                 "--resources", json.dumps(resources),
                                 "--dashboard-host", "127.0.0.1",
                                 "--dashboard-port", str(self.dashboard_port),
                                 "--ray-client-server-port", str(free_port())], self.env)
        wait_until(lambda: _http_ok(f"{self.dashboard}/api/version", self.headers),
                   "head node's dashboard", 240, self._node_died("head"))

    def add_worker(self, name: str, num_cpus: int, resources: dict[str, float]) -> str:
        """Start a worker node and wait until the head lists it alive; its node id."""
        before = {n["node_id"] for n in self.alive_nodes()}
        self._ray_start(name, ["--address", f"127.0.0.1:{self.gcs_port}",
                               "--num-cpus", str(num_cpus),
                               "--resources", json.dumps(resources)], self.env)
        new = wait_until(lambda: [n for n in self.alive_nodes() if n["node_id"] not in before
                                  and all(n["resources_total"].get(k) == v
                                          for k, v in resources.items())],
                         f"worker node {name} registered", 240, self._node_died(name))
        return new[0]["node_id"]

    def drain_for_preemption(self, node_id: str, deadline_s: int) -> None:
        """What a cloud's spot reclaim does through the autoscaler: Ray's drain with the
        preemption reason and a deadline (`ray drain-node`, with the cluster's token)."""
        out = subprocess.run(
            [str(VENV_BIN / "ray"), "drain-node", "--address", f"127.0.0.1:{self.gcs_port}",
             "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
             "--reason-message", "spot instance reclaimed (test)",
             "--deadline-remaining-seconds", str(deadline_s)],
            env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of a node at once (`ray start`, raylet, agents, the workers
        it runs): a lost machine."""
        _kill(_session(self.nodes[name].pid), signal.SIGKILL)
        self.nodes[name].wait()

    def alive_nodes(self) -> list[dict]:
        request = urllib.request.Request(f"{self.dashboard}/api/v0/nodes?limit=100",
                                         headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                nodes = json.loads(r.read())["data"]["result"]["result"]
        except (OSError, urllib.error.URLError, KeyError, ValueError):
            return []
        return [n for n in nodes if n["state"] == "ALIVE"]

    def _node_died(self, name: str) -> Callable[[], str | None]:
        def check() -> str | None:
            proc = self.nodes[name]
            if proc.poll() is None:
                return None
            log = (self.root / f"{name}.log").read_text(errors="replace")
            return f"`ray start` of {name} exited with {proc.returncode}:\n{log[-3000:]}"
        return check

    def shutdown(self) -> None:
        _stop(list(self.nodes.values()))


@pytest.fixture()
def cluster_root():
    root = Path(tempfile.mkdtemp(prefix="vj", dir="/tmp"))
    (root / "shared").mkdir()
    yield root
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def cluster(cluster_root):
    """Token authentication as cluster.yaml sets it: one token file on every node,
    ``RAY_AUTH_MODE=token``; the settings the job's command line expands exported on every
    node; the project's virtualenv first on PATH (the nodes' "installed package")."""
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
    token_file = cluster_root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    shared = cluster_root / "shared"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "VSPW_RAY_", "MLFLOW_"))}
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "VSPW_STORAGE": str(shared / "runs"),
        "VSPW_OPTUNA_STORAGE": f"sqlite:///{shared / 'optuna.db'}",
    })
    c = LocalCluster(cluster_root, env, token)
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def mlflow_server():
    """``mlflow server`` on loopback: SQLite backend, artifacts served by the server."""
    root = Path(tempfile.mkdtemp(prefix="vjml", dir="/tmp"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner processes (GenAI jobs)
    proc = _start([str(VENV_BIN / "mlflow"), "server",
                   "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                   "--default-artifact-root", "mlflow-artifacts:/",
                   "--artifacts-destination", str(root / "artifacts"),
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                  root / "mlflow.log", env)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _http_ok(f"{uri}/health"), "MLflow server /health", 180,
                   lambda: None if proc.poll() is None else
                   (root / "mlflow.log").read_text(errors="replace")[-2000:])
        yield uri
    finally:
        _stop([proc])
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def ci_data(cluster_root) -> Path:
    """The job's dataset, on the shared path: 10 videos (6 train, 2 val, 2 test) x 4 frames."""
    from vspw_ray.data.synth import SynthSpec, synthesize

    root = cluster_root / "shared" / "data"
    synthesize(root, SynthSpec(videos=10, frames=4, classes=6, height=64, width=80, seed=5),
               processes=1)
    return root


# --------------------------------------------------------------------------- jobs
def _client(cluster: LocalCluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard, headers=cluster.headers)


def submit(cluster: LocalCluster, args: list[str], env_vars: dict[str, str]) -> str:
    """``vspw-ray ARGS`` as a job: this repository as its working_dir (no pip/uv: the nodes
    have the packages), the driver on the head (its ``driver`` resource)."""
    entrypoint = "vspw-ray " + " ".join(a if a.startswith("$") or "=$" in a else shlex.quote(a)
                                        for a in args)
    return _client(cluster).submit_job(
        entrypoint=entrypoint, entrypoint_resources={"driver": 1},
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES,
                     "env_vars": {"VSPW_RAY_SHARED_MOUNT": str(cluster.root / "shared"),
                                  # names this cluster to State API calls inside the job (Ray
                                  # Train's PlacementGroupCleaner): with no address they look
                                  # for the Ray instances of this host, and this shared machine
                                  # runs others besides ours
                                  "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}",
                                  **env_vars}})


def job_finished(cluster: LocalCluster, job_id: str) -> Callable[[], str | None]:
    """For wait_until: a reason once the job has ended (its logs' tail), else None."""
    client = _client(cluster)

    def check() -> str | None:
        status = client.get_job_status(job_id)
        if not status.is_terminal():
            return None
        return f"job {job_id} ended {status}:\n{client.get_job_logs(job_id)[-4000:]}"
    return check


def wait_for_job(cluster: LocalCluster, job_id: str, timeout_s: float = JOB_TIMEOUT_S):
    """Poll the job's status until it ends; its status and logs."""
    from ray.job_submission import JobStatus

    client = _client(cluster)
    start = time.monotonic()
    try:
        status = wait_until(lambda: (s := client.get_job_status(job_id)).is_terminal() and s,
                            f"end of job {job_id}", timeout_s, poll_s=1.0)
    except AssertionError:
        client.stop_job(job_id)
        raise AssertionError(f"job {job_id} did not end within {timeout_s} s:\n"
                             f"{client.get_job_logs(job_id)[-4000:]}") from None
    logs = client.get_job_logs(job_id)
    info = client.get_job_info(job_id)
    print(f"job {job_id}: {status}, ran {(info.end_time - info.start_time) / 1000:.0f} s "
          f"({time.monotonic() - start:.0f} s waited here)")
    assert status == JobStatus.SUCCEEDED, f"job {job_id} {status}:\n{logs[-6000:]}"
    return status, logs


def _test_frames(data: Path) -> set[str]:
    names = set()
    for video in (data / "test.txt").read_text().split():
        names |= {f"{video}/{p.stem}.png" for p in (data / "data" / video / "origin").glob("*.jpg")}
    return names


# --------------------------------------------------------------------------- the tests
@pytest.mark.slow(95)
@pytest.mark.timeout(900)
def test_pipeline_job_on_a_two_node_cluster_with_token_auth_and_mlflow_server(
        cluster, mlflow_server, ci_data):
    """The CI pipeline (one UperNet and one MaskFormer, TTA at one scale + flip on val and
    test, grid ensemble, submission) as a Ray job: SUCCEEDED, the submission in shared storage,
    every stage's run in the MLflow server; a client without the token is refused. (With
    ``pipeline.search=true`` the job adds its 2-trial search: ~80-100 s more here.)"""
    from mlflow.tracking import MlflowClient

    cluster.start_head(num_cpus=0, resources={"driver": 1})
    cluster.add_worker("gpu1", num_cpus=4, resources={"trainer": 2, "tune_driver": 2})
    assert len(cluster.alive_nodes()) == 2

    refused = subprocess.run(  # `ray job list` from a shell with no token anywhere
        [str(VENV_BIN / "ray"), "job", "list", "--address", cluster.dashboard],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
             "HOME": str(cluster.root / "no-token-home")},
        capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "401" in refused.stdout + refused.stderr or \
        "nauthorized" in refused.stdout + refused.stderr, refused.stderr[-2000:]
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception, match="(?i)403|forbidden|invalid"):
        JobSubmissionClient(cluster.dashboard,
                            headers={"Authorization": f"Bearer {'0' * 64}"}).list_jobs()
    said = next(line for line in (refused.stdout + refused.stderr).splitlines()
                if "401" in line or "nauthorized" in line)
    print(f"a client without the token is refused: {said.strip()[:200]}")

    experiment = "ci_job_submission"
    job_id = submit(cluster, [
        "pipeline", CI_JOB, f"data.root={ci_data}", "storage.path=$VSPW_STORAGE",
        "tune.storage=$VSPW_OPTUNA_STORAGE", f"tracking.uri={mlflow_server}",
        f"tracking.experiment={experiment}",
        "train.resources_per_worker={CPU: 1, trainer: 1}",
        "tune.driver_resources={CPU: 1, tune_driver: 1}"], {})
    _, logs = wait_for_job(cluster, job_id)
    lines = logs.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage "))
    print("\n".join(lines[header:header + 6]))  # the pipeline's summary table
    assert "[pipeline] ensemble:all" in logs, logs[-3000:]

    # the submission, in the shared storage the nodes' environment named
    storage = Path(cluster.env["VSPW_STORAGE"])
    manifests = list(storage.glob("submissions/*/manifest.json"))
    assert len(manifests) == 1, manifests
    with zipfile.ZipFile(manifests[0].parent / "submission.zip") as z:
        assert set(z.namelist()) == _test_frames(ci_data)

    # MLflow, through the server's REST API
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("stage", "?"), []).append(run)
    print("MLflow runs through the server:",
          {stage: len(rs) for stage, rs in sorted(by_stage.items())})
    assert all(r.info.status == "FINISHED" for r in runs), \
        [(r.data.tags.get("stage"), r.info.status) for r in runs]
    (pipeline,) = by_stage["pipeline"]
    for stage, count in (("train", 2), ("infer", 4), ("ensemble", 1)):
        assert len(by_stage.get(stage, [])) == count, (stage, sorted(by_stage))
        assert all(r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id
                   for r in by_stage[stage]), stage
    assert {r.data.params.get("family") for r in by_stage["train"]} == {"upernet", "maskformer"}
    assert all("final/val_A/miou" in r.data.metrics for r in by_stage["train"])
    artifacts = {a.path for a in client.list_artifacts(pipeline.info.run_id)}
    assert {"summary.txt", "members.csv"} <= artifacts


@pytest.mark.slow(85)
@pytest.mark.timeout(900)
def test_preempted_node_checkpoints_at_the_drain_and_resumes_on_a_new_node(
        cluster, mlflow_server, ci_data):
    """A spot reclaim as Ray sees it: the training node drained with the preemption reason and a
    deadline while the job trains between two validations. The worker checkpoints at once, at
    the iteration it reached; a replacement node joins; Ray Train resumes there on it, and with
    ``train.max_failures=0`` the job still succeeds: a preemption is not a failure."""
    from mlflow.tracking import MlflowClient

    cluster.start_head(num_cpus=0, resources={"driver": 1})
    spot = cluster.add_worker("gpu1", num_cpus=2, resources={"trainer": 1})
    storage = Path(cluster.env["VSPW_STORAGE"])
    iters = 500  # ~18 it/s here: far from done when the 10 s deadline passes
    job_id = submit(cluster, [
        "train", CI_JOB, "--variant", "upernet", f"data.root={ci_data}",
        "storage.path=$VSPW_STORAGE", f"tracking.uri={mlflow_server}",
        "tracking.experiment=ci_preemption", f"train.iters={iters}",
        f"train.val_interval={iters}", "train.log_interval=2", "train.max_failures=0",
        "train.resources_per_worker={CPU: 1, trainer: 1}"],
        # Ray Train's drain watcher polls every 0.5 s instead of 5
        {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"})
    client = MlflowClient(mlflow_server)

    def training() -> bool:  # rank 0 logs its loss to the run every 2 iterations
        exp = client.get_experiment_by_name("ci_preemption")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return bool(runs) and any(m.step >= 10 for m in client.get_metric_history(
            runs[0].info.run_id, "train/loss"))

    wait_until(training, "training under way", JOB_TIMEOUT_S, job_finished(cluster, job_id))
    assert not registered_checkpoints(storage)  # no validation yet: nothing to resume from
    cluster.drain_for_preemption(spot, deadline_s=10)
    cluster.add_worker("gpu2", num_cpus=2, resources={"trainer": 1})  # the replacement

    _, logs = wait_for_job(cluster, job_id)
    runs = list(storage.glob("train/*"))
    assert len(runs) == 1, runs
    listed = {s["iteration"]: s for _, s in list_checkpoints(str(runs[0]))}
    final = read_state(max(list_checkpoints(str(runs[0])), key=lambda c: c[1]["iteration"])[0])
    print(f"preempted: resumed at {final['resumes']}, checkpoints at {sorted(listed)}")
    assert "to be preempted" in logs, logs[-3000:]
    assert final["iteration"] == iters and len(final["resumes"]) == 1, (final["resumes"], logs[-3000:])
    resumed_at = final["resumes"][0]
    # resumed from the checkpoint made at the drain, between validations (none ran before)
    assert 10 <= resumed_at < iters and resumed_at % 2 == 0, (resumed_at, logs[-3000:])


def _stopped(cluster: LocalCluster, job_id: str) -> float:
    """``ray job stop`` (the client's stop_job); seconds until the job is STOPPED."""
    from ray.job_submission import JobStatus

    client, start = _client(cluster), time.monotonic()
    client.stop_job(job_id)
    try:  # a slow stop: what is still alive, and where the driver waits (its stacks in the logs)
        wait_until(lambda: client.get_job_status(job_id).is_terminal(), "a prompt stop", 20,
                   poll_s=0.2)
    except AssertionError:
        print(f"the stop of job {job_id} is slow; its processes:\n{_job_processes(cluster)}")
    status = wait_until(lambda: (s := client.get_job_status(job_id)).is_terminal() and s,
                        f"the stop of job {job_id}", STOP_WAIT_S + 30, poll_s=0.2)
    assert status == JobStatus.STOPPED, status
    return time.monotonic() - start


def _job_processes(cluster: LocalCluster) -> str:
    """The processes whose command line names this cluster's folder (a job's entrypoint and
    driver) with their children; each ``vspw-ray`` driver is sent SIGUSR2, which makes it print
    every thread's stack into the job's logs."""
    import psutil

    lines = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(cluster.root) not in cmd or "vspw-ray" not in cmd:
            continue
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                masks = [ln.split()[-1] for ln in Path(f"/proc/{p.pid}/status").read_text(
                    ).splitlines() if ln.startswith(("SigBlk", "SigIgn", "SigCgt"))]
                lines.append(f"{p.pid} {p.status()} blocked/ignored/caught {'/'.join(masks)} "
                             f"{' '.join(p.cmdline())[:160]}")
                if "python" in p.cmdline()[0] and "vspw-ray" in " ".join(p.cmdline()):
                    os.kill(p.pid, signal.SIGUSR2)
    time.sleep(2)
    return "\n".join(lines)


STOP_ITERS = 200
@pytest.mark.slow(90)
@pytest.mark.timeout(900)
def test_stopped_job_resumes_and_survives_losing_the_training_node(cluster, mlflow_server,
                                                                     ci_data):
    """Training is pinned to the worker node (its ``trainer`` resource). ``ray job stop`` once
    the job's Train run has registered a checkpoint: the job ends STOPPED well within the wait
    (the driver takes Ctrl-C's path, ``RAY_JOB_STOP_SIGNAL=SIGINT``), saying how to resume,
    with its MLflow run ended KILLED and no checkpoint half-written. The same job submitted
    again resumes from the last registered checkpoint; once it registers another, every process
    of the node is killed, a replacement node joins, and the job succeeds, training resumed from
    that checkpoint: no iteration trained twice beyond the last checkpoint."""
    from mlflow.tracking import MlflowClient

    cluster.start_head(num_cpus=0, resources={"driver": 1})
    cluster.add_worker("gpu1", num_cpus=2, resources={"trainer": 1})
    storage = Path(cluster.env["VSPW_STORAGE"])
    args = ["train", CI_JOB, "--variant", "upernet", f"data.root={ci_data}",
            "storage.path=$VSPW_STORAGE", f"tracking.uri={mlflow_server}",
            "tracking.experiment=ci_node_loss", f"train.iters={STOP_ITERS}",
            "train.val_interval=20", "train.log_interval=20", "train.batch_size=4",
            "train.max_failures=3",
            "train.resources_per_worker={CPU: 1, trainer: 1}"]
    # as the README's submission and deploy/rayjob.yaml; the Train controller polls its
    # workers faster, so it registers checkpoints sooner
    env = {"RAY_JOB_STOP_SIGNAL": "SIGINT", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    # the first job waits after its first checkpoint until it is stopped (VSPW_RAY_PAUSE_AFTER):
    # ray job stop took 3-18 s here, long enough for a fast machine to train to the end
    first = submit(cluster, args, {**env, "VSPW_RAY_PAUSE_AFTER": "1"})
    wait_until(lambda: registered_checkpoints(storage), "a registered checkpoint of the job",
               JOB_TIMEOUT_S, job_finished(cluster, first), poll_s=0.1)
    took = _stopped(cluster, first)
    logs = _client(cluster).get_job_logs(first)
    print(f"`ray job stop` took {took:.1f} s (wait allowed: {STOP_WAIT_S} s)")
    # within the wait even when the job inherited SIGINT ignored (a background command of a
    # shell without job control): runtime.stop_on_sigterm acts on the job's stop signal
    assert took < STOP_WAIT_S, f"the driver outlived Ray's stop wait; its logs: {logs[-6000:]}"
    assert STOPPED in logs, logs[-12000:]
    stopped_at = max(read_summary(str(c))["iteration"] for c in registered_checkpoints(storage))
    assert stopped_at < STOP_ITERS
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("ci_node_loss").experiment_id])
    assert run.info.status == "KILLED"

    job_id = submit(cluster, args, env)  # the same job again
    wait_until(lambda: max((read_summary(str(c))["iteration"] for c in registered_checkpoints(
        storage)), default=0) > stopped_at, "a checkpoint registered after the resume",
        JOB_TIMEOUT_S, job_finished(cluster, job_id), poll_s=0.1)
    cluster.kill_node("gpu1")
    # the newest checkpoint registered when the node died: training resumes from it (or from
    # one the controller registered in the moment between the kill and this listing)
    killed_at = max(read_summary(str(c))["iteration"] for c in registered_checkpoints(storage))
    print(f"killed node gpu1 (its raylet, agents and Train worker) after the registered "
          f"checkpoint at iteration {killed_at}")
    cluster.add_worker("gpu2", num_cpus=2, resources={"trainer": 1})  # the replacement

    _, logs = wait_for_job(cluster, job_id)
    runs = list(storage.glob("train/*"))
    assert len(runs) == 1, runs
    final = read_state(max(list_checkpoints(str(runs[0])),
                           key=lambda c: c[1]["iteration"])[0])
    print(f"final iteration {final['iteration']}, resumed at {final['resumes']}")
    assert final["iteration"] == STOP_ITERS
    assert len(final["resumes"]) == 2 and final["resumes"][0] == stopped_at, \
        (final["resumes"], stopped_at, logs[-3000:])  # the stop cost nothing registered
    assert stopped_at < killed_at <= final["resumes"][1] < STOP_ITERS, \
        (final["resumes"], killed_at, logs[-3000:])
    (run,) = client.search_runs([client.get_experiment_by_name("ci_node_loss").experiment_id])
    assert run.info.status == "FINISHED"  # the stopped run, resumed and finished
    assert_no_half_written_left(storage)  # whatever the stop or the node loss cut off
