"""`vspw-ray evaluate` throughput on 853x480 frames vs only decoding the same PNGs.

Both sides use the same number of processes (every core). Also measures the peak memory of an
evaluate run at two dataset sizes: it should not grow with the number of frames.
Prints JSON lines last: {"metric", "value", "target", "unit"}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vspw_ray.data import list_frames, read_split  # noqa: E402
from vspw_ray.data.synth import SynthSpec, synthesize  # noqa: E402
from vspw_ray.parallel import map_videos  # noqa: E402


def _decode_video(root: str, video: str, pred_dir: str) -> int:
    n = 0
    for f in list_frames(root, video):
        np.asarray(Image.open(f.mask))
        np.asarray(Image.open(Path(pred_dir) / video / f"{f.name}.png"))
        n += 1
    return n


def _write_predictions(root: Path, out: Path) -> None:
    rng = np.random.default_rng(0)
    for video in read_split(root, "val"):
        (out / video).mkdir(parents=True, exist_ok=True)
        for f in list_frames(root, video):
            raw = np.asarray(Image.open(f.mask)).astype(np.int16) - 1
            pred = np.where((raw < 0) | (raw > 30) | (rng.random(raw.shape) < 0.1), 0, raw)
            Image.fromarray(pred.astype(np.uint8)).save(out / video / f"{f.name}.png")


def _peak_rss_mb(root: Path, pred: Path, split: str) -> float:
    code = ("import resource,sys;from vspw_ray.evaluate import evaluate_predictions;"
            f"evaluate_predictions('{pred}','{root}','{split}');"
            "r=resource.getrusage;print(max(r(resource.RUSAGE_SELF).ru_maxrss,"
            "r(resource.RUSAGE_CHILDREN).ru_maxrss)/1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from vspw_ray.evaluate import evaluate_predictions

    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    try:
        small, large = tmp / "small", tmp / "large"
        # 853x480 frames, like VSPW_480p; val is 20% of the videos
        synthesize(large, SynthSpec(videos=20, frames=24, classes=30, height=480, width=853, seed=0))
        synthesize(small, SynthSpec(videos=20, frames=6, classes=30, height=480, width=853, seed=0))
        for r in (small, large):
            _write_predictions(r, r / "pred")
        videos = read_split(large, "val")
        frames = sum(len(list_frames(large, v)) for v in videos)

        jobs = [(str(large), v, str(large / "pred")) for v in videos]
        decode_fps, eval_fps = [], []
        for _ in range(3):  # interleaved, best of three: the machine is shared
            t = time.perf_counter()
            n = sum(map_videos(_decode_video, jobs, processes=cores))
            decode_fps.append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            evaluate_predictions(large / "pred", large, "val", processes=cores)
            eval_fps.append(frames / (time.perf_counter() - t))
        mem_small = _peak_rss_mb(small, small / "pred", "val")
        mem_large = _peak_rss_mb(large, large / "pred", "val")
        small_frames = sum(len(list_frames(small, v)) for v in read_split(small, "val"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"frames {frames} (853x480), processes {cores}")
    print(f"decode only: {max(decode_fps):.1f} frames/s; evaluate: {max(eval_fps):.1f} frames/s")
    print(f"peak RSS: {mem_small:.0f} MB at {small_frames} frames, {mem_large:.0f} MB at {frames} frames")
    for metric, value, target, unit in [
        ("evaluate_fps", max(eval_fps), None, "frames/s"),
        ("decode_only_fps", max(decode_fps), None, "frames/s"),
        ("evaluate_vs_decode_ratio", max(eval_fps) / max(decode_fps), 0.5, "ratio"),
        ("peak_rss_growth_4x_frames", mem_large / mem_small, 1.1, "ratio"),
    ]:
        print(json.dumps({"metric": metric, "value": round(value, 3), "target": target, "unit": unit}))


if __name__ == "__main__":
    main()
