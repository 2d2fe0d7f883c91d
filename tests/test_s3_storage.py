"""Remote storage end to end: `train --from` an S3 checkpoint, `infer` and `tune`'s report with
``storage.path`` on a local S3-compatible server (moto, on loopback). Every checkpoint, score
file, PNG and best config must land under the URI, and nothing under the local folders."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "tiny_synth.yaml"
BUCKET = "vspw-test"
pytestmark = pytest.mark.slow(105)


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    """A moto S3 server on loopback and the environment that points pyarrow (and so Ray Train)
    at it; the server is stopped at the end of the module."""
    pytest.importorskip("moto")
    import pyarrow.fs

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:  # wait for the server to answer, not for a fixed time
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    pyarrow.fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True,
                            access_key="testing", secret_key="testing",
                            region="us-east-1").create_dir(BUCKET)
    yield env
    server.terminate()
    server.wait()


def _s3_files(env: dict, prefix: str) -> list[str]:
    import pyarrow.fs

    fs = pyarrow.fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing",
                                 secret_key="testing", region="us-east-1")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/{prefix}", recursive=True,
                                                     allow_not_found=True))
    return sorted(i.path.split("/", 1)[1] for i in infos if i.type == pyarrow.fs.FileType.File)


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "vspw_ray", *args], cwd=cwd,
                         env={**os.environ, **env, "PYTHONPATH": str(EXPERIMENT.parents[1])},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{args[0]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _local_checkpoint(root: Path, folder: Path) -> str:
    """A freshly initialised tiny UperNet checkpoint of the experiment's crop64 variant; returns
    its variant_id."""
    import torch

    from vspw_ray.config import load_config, resolve_variant, variant_id
    from vspw_ray.data import load_class_table
    from vspw_ray.models import build_model
    from vspw_ray.train.loop import build_optimizer, build_scheduler
    from vspw_ray.train.ray_train import save_training_state

    cfg = resolve_variant(load_config(EXPERIMENT, [f"data.root={root}"]), "crop64")
    torch.manual_seed(0)
    model = build_model(cfg, load_class_table(root).num_classes)
    opt = build_optimizer(model, cfg.train)
    folder.mkdir(parents=True)
    save_training_state(folder, model=model, optimizer=opt,
                        scheduler=build_scheduler(opt, cfg.train), scaler=None, iteration=0,
                        cfg=cfg, variant=variant_id(cfg))
    return variant_id(cfg)


def test_train_from_s3_infer_and_tune_report_keep_everything_under_the_uri(
        s3_env, synth_root, tmp_path):
    import pyarrow.fs

    storage = f"s3://{BUCKET}/runs"
    work = tmp_path / "work"  # the commands' working folder: nothing may be written here
    work.mkdir()
    common = [f"data.root={synth_root}", f"storage.path={storage}", "data.loader_workers=0",
              "data.crop_size=[64,64]", "train.batch_size=2", "train.log_interval=2",
              "train.warmup_iters=1", "--no-track"]
    # a starting checkpoint uploaded to S3, as a team would share one
    local = tmp_path / "upload"
    _local_checkpoint(synth_root, local)
    fs = pyarrow.fs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"],
                                 access_key="testing", secret_key="testing", region="us-east-1")
    pyarrow.fs.copy_files(str(local), f"{BUCKET}/init/ckpt", destination_filesystem=fs)

    train = _run(["train", str(EXPERIMENT), "--variant", "crop64", "--from",
                  f"s3://{BUCKET}/init/ckpt", "train.iters=4", "train.val_interval=4", *common],
                 s3_env, work)
    checkpoints = [p for p in _s3_files(s3_env, "runs/train") if p.endswith("checkpoint.pt")]
    assert checkpoints, _s3_files(s3_env, "runs")
    # the console holds our progress lines, not Ray Train's dumps, its line per checkpoint or
    # State API complaints
    console = train.stdout + train.stderr
    assert "it 2/4" in console and "it 4/4" in console
    assert "Reporting training result" not in console and "State API" not in console
    assert "Checkpoint successfully created" not in console
    assert "Started training worker group" not in console  # Ray Train's INFO: its log files
    assert "Setting up process group" not in console

    # the variant trained from those weights (init_checkpoint is part of its identity): its
    # checkpoint is found in the run layout on S3
    infer = _run(["infer", str(EXPERIMENT), "--variant", "crop64", "--split", "val",
          f"model.init_checkpoint=s3://{BUCKET}/init/ckpt/checkpoint.pt", "train.iters=4",
          "train.val_interval=4", "infer.scales=[1.0]",
          "infer.flip=false", "infer.actors=1", *common], s3_env, work)
    console = infer.stdout + infer.stderr  # our progress, not Ray Data's start and plan lines
    assert "model actor(s)" in console, console[-3000:]
    assert "Starting execution of Dataset" not in console and "Execution plan" not in console
    assert "execution finished" not in console  # Ray Data's INFO lines: in its log file only
    from vspw_ray.data import split_frames

    frames = split_frames(synth_root, "val")
    pngs = [p for p in _s3_files(s3_env, "runs/predictions") if p.endswith(".png")]
    scores = [p for p in _s3_files(s3_env, "runs/scores") if p.endswith(".parquet")]
    assert len(pngs) == len(frames)
    assert len(scores) == len({f.video for f in frames})
    assert any(p.endswith("manifest.json") for p in _s3_files(s3_env, "runs/scores"))

    tune = _run(["tune", str(EXPERIMENT), "tune.num_samples=1", "tune.iters=2", "tune.grace_period=2",
          f"tune.storage=sqlite:///{tmp_path / 'optuna.db'}", "train.val_interval=2",
          "train.iters=2", *common], s3_env, work)
    best = [p for p in _s3_files(s3_env, "runs/tune") if "/best/" in p and p.endswith(".yaml")]
    assert best, _s3_files(s3_env, "runs/tune")
    console = tune.stdout + tune.stderr  # tracked in MLflow: no TensorBoard files, no hint
    assert "tensorboard" not in console.lower(), console[-3000:]
    assert not [p for p in _s3_files(s3_env, "runs/tune") if "events.out.tfevents" in p]
    assert [p for p in _s3_files(s3_env, "runs/tune") if p.endswith("progress.csv")]

    # nothing landed on local disk: not in the working folder, not in a folder named "s3:"
    assert sorted(p.name for p in work.rglob("*")) == []
