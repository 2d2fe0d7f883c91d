"""Score store size and fidelity: how the stored encoding of class scores compares with dense
scores for a hierarchical fusion P = P_S + alpha P_W + beta P_A of three members.

Members are three real checkpoints of a tiny UperNet trained on CamVid (the training run's best
and latest checkpoints and its SWA average, from ``benchmarks/swa_camvid.py --storage DIR``; run
here when ``--runs`` is not given). For each encoding tried (resolution x top-k x log step, plus
8-bit linear probabilities for contrast) it reports Parquet bytes per frame against dense fp16
scores at the frame's size, and the fused mIoU (and the rarest classes' IoU) from the store
against the same fusion of dense scores, on CamVid val (101 frames, 360x480, 11 classes).
Store bytes grow with top-k and resolution, not with the class count, so the ratio at VSPW
scale (124 classes, 853x480) is projected from the measured bytes per stored pixel.

    python benchmarks/score_store.py [--runs DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
ALPHA, BETA = 0.6, 0.4
ENCODINGS = [(1.0, 4, 1 / 32), (0.5, 4, 1 / 32), (0.5, 8, 1 / 32), (0.25, 4, 1 / 32),
             (0.25, 8, 1 / 32), (0.25, 8, 1 / 16), (0.25, 2, 1 / 32), (0.125, 8, 1 / 32)]


def members(runs: Path) -> list[Path]:
    from vspw_ray.checkpoints import list_checkpoints

    train = sorted(list_checkpoints(str(next(runs.glob("train/*")))),
                   key=lambda x: x[1]["iteration"])
    swa = [p for p, s in list_checkpoints(str(next(runs.glob("swa/*"))))
           if s["kind"] == "swa_average"]
    best = max(train, key=lambda x: x[1]["metrics"]["val_A/miou"])[0]
    latest = train[-1][0]
    picked = [swa[0], latest if latest != best else train[0][0], best]
    return [Path(p) / "checkpoint.pt" for p in picked]


def dense_scores(ckpt: Path, frames, cfg, num_classes):
    import torch

    from vspw_ray.data import read_image
    from vspw_ray.data.transforms import normalize
    from vspw_ray.infer.job import load_inference_model
    from vspw_ray.infer.tta import tta_probs

    model, _ = load_inference_model(str(ckpt), num_classes)
    out = []
    with torch.no_grad():
        for f in frames:
            x = normalize(read_image(f), cfg.data.mean, cfg.data.std)[None]
            out.append(tta_probs(model, x, cfg.infer.scales, cfg.infer.flip).half())
    return out


def fused_miou(preds, frames, lut, num_classes):
    import numpy as np

    from vspw_ray.data import read_mask
    from vspw_ray.metrics import ConfusionMatrix, iou_per_class

    cm = ConfusionMatrix(num_classes)
    for pred, f in zip(preds, frames):
        cm.update(pred, read_mask(f, lut))
    ious = iou_per_class(cm.matrix)
    present = ~np.isnan(ious)
    return float(np.nanmean(ious)), ious, present


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", help="storage folder of a swa_camvid.py run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from vspw_ray.config import load_config
    from vspw_ray.data import label_lut, load_class_table, split_frames
    from vspw_ray.data.stats import class_stats
    from vspw_ray.scores.encoding import ScoreEncoding, decode, encode
    from vspw_ray.scores.store import SCHEMA

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs) if args.runs else Path(tmp) / "runs"
        if not args.runs:
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "swa_camvid.py"),
                            "--storage", str(runs), "--iters", "300", "--extra", "100"],
                           check=True)
        cfg = load_config(ROOT / "experiments" / "tiny_camvid.yaml", [f"data.root={CAMVID}"])
        table = load_class_table(CAMVID)
        c = table.num_classes
        frames = split_frames(CAMVID, "val")
        lut = label_lut(c)
        ckpts = members(runs)
        print("members:", *[str(p) for p in ckpts], sep="\n  ", flush=True)
        dense = [dense_scores(p, frames, cfg, c) for p in ckpts]

    def fuse(ps):
        return [(s.float() + ALPHA * w.float() + BETA * a.float()).argmax(0).numpy().astype(np.uint8)
                for s, w, a in zip(*ps)]

    ref_miou, ref_ious, present = fused_miou(fuse(dense), frames, lut, c)
    pixels = np.array([cl["pixels"] for cl in class_stats(CAMVID, "val", processes=1)["classes"]])
    rare = [i for i in np.argsort(pixels) if present[i]][:3]
    h, w = dense[0][0].shape[-2:]
    dense_bytes = c * h * w * 2
    print(f"dense fusion mIoU {100 * ref_miou:.2f}; dense fp16 {dense_bytes / 1e6:.2f} MB/frame; "
          f"rarest classes {[table.names[i] for i in rare]}", flush=True)
    print(f"{'scale':>6} {'top_k':>5} {'step':>6} {'bytes/frame':>12} {'ratio':>8} "
          f"{'dmIoU':>7} {'rare dIoU':>24} {'VSPW ratio':>11}")
    lines = []
    chosen = (0.25, 8, 1 / 32)
    for scale, k, step in ENCODINGS + [("linear8", 8, None)]:
        linear = scale == "linear8"
        enc = ScoreEncoding(0.25 if linear else scale, k, step or 1 / 32)
        decoded, size, stored_px = [], 0, 0
        for member in dense:
            out, rows = [], []
            for f, probs in zip(frames, member):
                e = encode(probs.float(), enc)
                if linear:  # plain 8-bit probabilities of the same top-k, for contrast
                    p = np.exp(-e.codes.astype(np.float32) * enc.step)
                    q = np.round(p * 255).astype(np.uint8)
                    codes = np.where(q > 0, np.round(-np.log(np.maximum(q, 1) / 255) / enc.step),
                                     255).astype(np.uint8)
                    e = type(e)(e.classes, codes, e.height, e.width)
                rows.append({"video": f.video, "frame": f.name, "height": e.height,
                             "width": e.width, "score_height": e.classes.shape[1],
                             "score_width": e.classes.shape[2], "classes": e.classes.tobytes(),
                             "codes": e.codes.tobytes()})
                stored_px += e.classes.shape[1] * e.classes.shape[2]
                out.append(decode(e, c, enc))
            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sink, compression="zstd")
            size += sink.getvalue().size
            decoded.append(out)
        miou, ious, _ = fused_miou(fuse(decoded), frames, lut, c)
        per_frame = size / len(dense) / len(frames)
        bytes_per_px = size / stored_px
        vspw = (bytes_per_px * (853 * 480 * (0.25 if linear else scale) ** 2)) / (124 * 853 * 480 * 2)
        d_rare = [100 * (ious[i] - ref_ious[i]) for i in rare]
        label = "linear8" if linear else f"{scale:g}"
        print(f"{label:>6} {k:>5} {'' if linear else f'1/{round(1 / step)}':>6} "
              f"{per_frame:>12,.0f} {per_frame / dense_bytes:>8.4f} {100 * (miou - ref_miou):>+7.3f} "
              f"{' '.join(f'{x:+.2f}' for x in d_rare):>24} {vspw:>11.5f}", flush=True)
        if (scale, k, step) == chosen:
            lines += [
                {"metric": "store_bytes_per_frame_over_dense_fp16_camvid",
                 "value": round(per_frame / dense_bytes, 5), "target": 0.01, "unit": "ratio"},
                {"metric": "store_bytes_per_frame_over_dense_fp16_vspw_projected",
                 "value": round(vspw, 5), "target": 0.01, "unit": "ratio"},
                {"metric": "fused_miou_change_store_vs_dense",
                 "value": round(100 * (miou - ref_miou), 3), "target": 0.1, "unit": "points"},
                {"metric": "rarest_class_iou_change_max_abs",
                 "value": round(max(abs(x) for x in d_rare), 3), "target": None,
                 "unit": "points"},
            ]
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
