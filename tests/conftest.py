"""Shared fixtures: the real CamVid clip set beside the clone, and a synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vspw_ray.data.synth import SynthSpec, synthesize

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid"
DEFAULT_SLOW_S = 30  # a ``slow`` test without its own estimate


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadfile``: a file's tests run on one worker, its module
    fixtures -- the smoke run, the ensemble's members, the MLflow server -- made once), the
    longest files first by their tests' ``@pytest.mark.slow(seconds)`` estimates (rough,
    single-run), so that the workers, each taking the next file when it is free, end together
    instead of one of them starting the longest file last. Inside a file, and in a plain run,
    the collected order stays."""
    if not hasattr(config, "workerinput"):  # not an xdist worker: the order it collects in
        return
    def seconds(item) -> float:
        mark = item.get_closest_marker("slow")
        return 0 if mark is None else (mark.args[0] if mark.args else DEFAULT_SLOW_S)
    per_file: dict[str, float] = {}
    for item in items:
        per_file[item.path] = per_file.get(item.path, 0) + seconds(item)
    items.sort(key=lambda item: per_file[item.path], reverse=True)  # stable inside a file


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    """``../shared/data/camvid``: skipped when absent, except under CI=true where that fails."""
    if not (CAMVID / "label_num_dic_final.json").is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real-image test data {CAMVID} is missing in CI: shared/ must lie "
                        f"beside the clone")
        pytest.skip(f"real-image test data {CAMVID} is absent (it lies beside the clone in CI)")
    return CAMVID


@pytest.fixture(scope="session")
def camvid_four_frames(camvid_root):
    """The first four CamVid training frames at 120x160: ``images [4, 3, 120, 160]`` normalised,
    ``masks [4, 120, 160]`` int64 reduced ids -- what the fit tests train on."""
    import numpy as np
    import torch
    from PIL import Image

    from vspw_ray.config import DataConfig
    from vspw_ray.data import label_lut, read_image, read_mask, split_frames
    from vspw_ray.data.transforms import normalize

    lut, data = label_lut(11), DataConfig()
    frames = split_frames(camvid_root, "train")[:4]
    images = torch.stack([normalize(np.asarray(Image.fromarray(read_image(f)).resize(
        (160, 120), Image.BILINEAR)), data.mean, data.std) for f in frames])
    masks = torch.stack([torch.from_numpy(np.asarray(Image.fromarray(read_mask(f, lut)).resize(
        (160, 120), Image.NEAREST)).astype(np.int64)) for f in frames])
    return images, masks


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic VSPW-layout dataset, shared read-only by the session's tests."""
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, SynthSpec(videos=8, frames=12, classes=6, height=64, width=80, seed=3),
               processes=1)
    return root


@pytest.fixture()
def synth_copy(tmp_path, synth_root) -> Path:
    """A private copy of the synthetic dataset that a test may break."""
    import shutil

    dst = tmp_path / "synth"
    shutil.copytree(synth_root, dst)
    return dst


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance per test file that submits work to it, with more logical CPUs
    than this 2-core machine has, so a driver plus two Train workers fit. Per file, not per
    session: an idle instance costs ~7.5 % of a core, and under xdist each worker would keep
    one up to the end of the run."""
    import ray

    from vspw_ray.runtime import (
        API_SERVER_ENV,
        pin_local_dashboard,
        restored_environ,
        use_local_ray_train_settings,
    )

    if not ray.is_initialized():
        use_local_ray_train_settings()  # as connect_ray's local instances
        # with the dashboard, as the CLI's local instances: it serves the State API, without
        # which Ray Train's placement-group cleaner can take a live run's controller for dead;
        # its address pinned for Ray's processes only, so that the clusters and CLI commands
        # other tests start never inherit this instance's address
        with restored_environ(API_SERVER_ENV):
            ray.init(address="local", num_cpus=4, log_to_driver=False, include_dashboard=True,
                     dashboard_port=pin_local_dashboard())
    yield ray
    ray.shutdown()
