"""What a user reads on the console when a worker fails: the error with its traceback (the
console of a good run is checked in tests/test_s3_storage.py: progress lines, no Ray Train
dumps, no State API complaints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "tiny_synth.yaml"


def _train(root: Path, storage: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VSPW_RAY_DASHBOARD")}
    return subprocess.run(
        [sys.executable, "-m", "vspw_ray", "train", str(EXPERIMENT), "--variant", "crop64",
         "--no-track", f"data.root={root}", f"storage.path={storage}", "train.iters=4",
         "train.val_interval=2", "train.log_interval=2", "train.warmup_iters=1",
         "train.batch_size=2", "data.loader_workers=0", "train.max_failures=0", *extra],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.mark.slow(28)
def test_a_worker_error_reaches_the_console_with_its_traceback(synth_copy, tmp_path):
    from vspw_ray.data import split_frames

    frames = split_frames(synth_copy, "train")
    for frame in frames:  # every training frame unreadable: the first batch fails in the worker
        frame.image.write_bytes(b"not a jpeg")
    out = _train(synth_copy, tmp_path / "runs")
    console = out.stdout + out.stderr
    assert out.returncode != 0
    assert "Traceback" in console and "cannot read image" in console, console[-3000:]
    assert any(str(f.image) in console for f in frames)  # names the frame
