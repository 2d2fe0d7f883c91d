"""`vspw-ray infer` pipeline efficiency and memory, on real CamVid frames (360x480).

(a) frames/s of the Ray Data job (one model actor) / frames/s of the same model, TTA and score
    encoding on pre-decoded tensors in one process, with the same torch thread count
    (target >= 0.85); both end to end and in steady state (first to last output frame).
(c) peak memory (resident set of the driver plus every Ray worker, polled) with 1x and 4x the
    frames (target: flat).

    python benchmarks/infer_pipeline.py [--videos 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
EXPERIMENT = ROOT / "experiments" / "tiny_camvid.yaml"
SCALES = "[0.75,1.0,1.25]"


class PeakRSS:
    """Peak of the summed resident memory of this process and all its descendants (read from
    /proc every ``interval`` seconds)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _sample() -> int:
        parents: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(stat.parent.name)
            parents.setdefault(int(fields[1]), []).append(pid)
            rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        total, todo = 0, [os.getpid()]
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            todo.extend(parents.get(pid, []))
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _root_with_splits(tmp: Path, videos: list[str], sizes: dict[str, int]) -> Path:
    root = tmp / "camvid"
    root.mkdir()
    (root / "data").symlink_to(CAMVID / "data")
    shutil.copy(CAMVID / "label_num_dic_final.json", root)
    for name, n in sizes.items():
        (root / f"{name}.txt").write_text("".join(f"{v}\n" for v in videos[:n]))
    return root


def plain_frames_per_s(cfg, ckpt: Path, root: Path, split: str, threads: int) -> tuple[float, int]:
    import numpy as np
    import torch
    from PIL import Image

    from vspw_ray.data import load_class_table, read_image, split_frames
    from vspw_ray.data.transforms import normalize
    from vspw_ray.infer.job import load_inference_model
    from vspw_ray.infer.tta import tta_probs
    from vspw_ray.scores.encoding import ScoreEncoding, encode

    torch.set_num_threads(threads)
    table = load_class_table(root)
    model, _ = load_inference_model(str(ckpt / "checkpoint.pt"), table.num_classes)
    frames = split_frames(root, split)
    tensors = [normalize(read_image(f), cfg.data.mean, cfg.data.std)[None] for f in frames]
    enc = ScoreEncoding(cfg.infer.score_scale, cfg.infer.top_k, cfg.infer.score_step)
    start = time.perf_counter()
    for x in tensors:
        probs = tta_probs(model, x, cfg.infer.scales, cfg.infer.flip)
        buf = io.BytesIO()
        Image.fromarray(probs.argmax(0).to(torch.uint8).numpy(), mode="L").save(buf, "PNG")
        e = encode(probs, enc)
        _ = (np.asarray(e.classes).tobytes(), np.asarray(e.codes).tobytes())
    return len(tensors) / (time.perf_counter() - start), len(tensors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--videos", type=int, default=3, help="videos in the 1x run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not CAMVID.is_dir():
        sys.exit(f"{CAMVID} is missing")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")

    import ray

    from vspw_ray.config import load_config
    from vspw_ray.infer.job import run_inference
    from vspw_ray.train.ray_train import save_training_state

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        videos = (CAMVID / "train.txt").read_text().split()
        root = _root_with_splits(tmp, videos, {"one": args.videos, "four": 4 * args.videos})
        cfg = load_config(EXPERIMENT, [f"data.root={root}", f"storage.path={tmp / 'runs'}",
                                       f"infer.scales={SCALES}", "infer.actors=1",
                                       "infer.batch_size=1"])
        import torch

        from vspw_ray.config import variant_id
        from vspw_ray.data import load_class_table
        from vspw_ray.models import build_model
        from vspw_ray.train.loop import build_optimizer, build_scheduler

        torch.manual_seed(0)
        model = build_model(cfg, load_class_table(root).num_classes)
        opt = build_optimizer(model, cfg.train)
        ckpt = tmp / "ckpt"
        ckpt.mkdir()
        save_training_state(ckpt, model=model, optimizer=opt,
                            scheduler=build_scheduler(opt, cfg.train), scaler=None, iteration=0,
                            cfg=cfg, variant=variant_id(cfg))

        plain, n = plain_frames_per_s(cfg, ckpt, root, "one", args.threads)
        print(f"plain process: {plain:.3f} frames/s over {n} frames ({args.threads} thread)",
              flush=True)
        ray.init(num_cpus=os.cpu_count(), log_to_driver=False, include_dashboard=False)
        results = {}
        for split in ("one", "four"):
            with PeakRSS() as mem:
                start = time.perf_counter()
                out = run_inference(cfg, str(ckpt), split, store=str(tmp / f"store_{split}"),
                                    predictions=str(tmp / f"pred_{split}"), track=False,
                                    torch_threads=args.threads)
                wall = time.perf_counter() - start
            results[split] = (out, wall, mem.peak)
            print(f"vspw-ray infer ({split}): {out.frames} frames in {wall:.1f} s, steady "
                  f"{out.frames_per_s_steady:.3f} frames/s, peak RSS {mem.peak / 2**30:.2f} GiB",
                  flush=True)
        ray.shutdown()
    one, wall_one, peak_one = results["one"]
    four, wall_four, peak_four = results["four"]
    lines = [
        {"metric": "infer_vs_plain_frames_per_s_steady", "value": round(four.frames_per_s_steady / plain, 3),
         "target": 0.85, "unit": "ratio"},
        {"metric": "infer_vs_plain_frames_per_s_end_to_end",
         "value": round(four.frames / wall_four / plain, 3), "target": 0.85, "unit": "ratio"},
        {"metric": "plain_frames_per_s", "value": round(plain, 3), "target": None, "unit": "frames/s"},
        {"metric": "peak_rss_4x_over_1x_frames", "value": round(peak_four / peak_one, 3),
         "target": 1.0, "unit": "ratio"},
        {"metric": "peak_rss_1x", "value": round(peak_one / 2**30, 2), "target": None, "unit": "GiB"},
    ]
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
