"""GPU TTA throughput without Ray: one view at a time (``tta_probs``, the reference) vs each
scale's flip pair and several frames of one size per forward (``tta_frames``, what the infer
actor runs), both families, 480x853 frames, 6 scales x flip, bf16 autocast.

Each part runs in its own process under a time cap and prints one JSON line when it ends,
flushed: frames/s, TFLOP per frame (``FlopCounterMode`` over one frame's views), MFU against the
chip's dense bf16 peak, peak memory; and, for the batched path, the largest difference from
the reference's probabilities on the first frame. Imports are checked first. The last lines
are the repository's ``{"metric", "value", "target", "unit"}`` records (target: >= 5
frames/s per GPU for Swin-L UperNet, issue 18).

Usage::

    python benchmarks/gpu_tta.py                  # Swin-L, 480x853, 4 frames per call
    python benchmarks/gpu_tta.py --tiny           # tiny models on the CPU, < 2 minutes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_train_step import (  # noqa: E402
    FAMILIES,
    NEEDED,
    check_imports,
    emit,
    model_config,
    peak_memory_gib,
    peak_tflops,
    run_parts,
)

SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def per_view(model, frames, device, autocast) -> list:
    """The one-view-at-a-time path as the infer actor ran it before batching: each frame
    normalised on the host, copied, and its 12 views run one by one."""
    from vspw_ray.data.transforms import normalize
    from vspw_ray.infer.tta import tta_probs

    return [tta_probs(model, normalize(f, MEAN, STD).unsqueeze(0).to(device), SCALES, True,
                      autocast) for f in frames]


def batched(model, frames, device, autocast) -> list:
    from vspw_ray.infer.tta import tta_frames

    out = dict(tta_frames(model, frames, mean=MEAN, std=STD, scales=SCALES, flip=True,
                          autocast=autocast, device=device, batch_size=len(frames)))
    return [out[i] for i in range(len(frames))]


def frames_per_s(fn, model, frames, device, autocast, cap_s: float) -> tuple[float, list]:
    """One call to warm up (kernel selection), then calls until ``cap_s``; the probabilities
    are copied to the host each call, as the actor encodes them."""
    first = [p.cpu() for p in fn(model, frames, device, autocast)]
    start, n = time.perf_counter(), 0
    while n == 0 or time.perf_counter() - start < cap_s:
        [p.argmax(0).cpu() for p in fn(model, frames, device, autocast)]
        n += len(frames)
    return n / (time.perf_counter() - start), first


def tta_part(part: str, args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vspw_ray.models import build_model
    from vspw_ray.precision import autocast_context

    family, path = part.split("_", 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(model_config(family, args.tiny, 64, 2), args.classes).to(device).eval()
    # FlopCounterMode's module hooks trip over views of weights that require grad (MaskFormer's
    # query embedding): an inference model needs no gradients anyway
    model.requires_grad_(False)
    autocast, _ = autocast_context(device, "auto")
    h, w = args.size
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(args.frames)]
    fn = batched if path == "batched" else per_view
    with FlopCounterMode(display=False) as counter:
        fn(model, frames[:1], device, autocast)
    rate, probs = frames_per_s(fn, model, frames, device, autocast, args.part_seconds / 2)
    peak, flops = peak_tflops(device), counter.get_total_flops()
    record = {"part": part, "device": torch.cuda.get_device_name() if device.type == "cuda"
              else "cpu", "frame": f"{h}x{w}", "views": 2 * len(SCALES),
              "frames_per_call": len(frames) if path == "batched" else 1,
              "frames_per_s": round(rate, 3), "tflop_per_frame": round(flops / 1e12, 3),
              "mfu": round(flops * rate / (peak * 1e12), 4) if peak else None,
              "peak_mem_gib": round(peak_memory_gib(device), 2)}
    if path == "batched":
        reference = per_view(model, frames[:1], device, autocast)[0].cpu()
        record["max_abs_diff_vs_per_view"] = float((probs[0] - reference).abs().max())
        record["argmax_agreement"] = float((probs[0].argmax(0) == reference.argmax(0))
                                           .float().mean())
    emit(record)


def summary(records: list[dict]) -> None:
    for r in records:
        if "frames_per_s" in r:
            target = 5.0 if r["part"] == "upernet_batched" else None
            emit({"metric": f"tta_{r['part']}_frames_per_s", "value": r["frames_per_s"],
                  "target": target, "unit": "frames/s"})
            emit({"metric": f"tta_{r['part']}_mfu", "value": r["mfu"], "target": None,
                  "unit": "fraction"})


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models, 60x107 frames, 2 per call")
    p.add_argument("--parts", nargs="*", default=[f"{f}_{p}" for f in FAMILIES
                                                  for p in ("per_view", "batched")])
    p.add_argument("--frames", type=int, default=None, help="frames per call (infer.batch_size)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--classes", type=int, default=124)
    p.add_argument("--budget", type=float, default=300.0, help="seconds for all parts")
    p.add_argument("--part-seconds", type=float, default=None, help="cap of each part")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.frames = args.frames or (2 if args.tiny else 4)
    args.size = args.size or ((60, 107) if args.tiny else (480, 853))
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        tta_part(args.child, args)
        return
    if not check_imports(NEEDED + ("vspw_ray.infer.tta",)):
        sys.exit(1)
    caps = {p: args.part_seconds or (20 if args.tiny else 60) for p in args.parts}
    extra = [f"--frames={args.frames}", "--size", str(args.size[0]), str(args.size[1]),
             f"--classes={args.classes}"] + (["--tiny"] if args.tiny else [])
    summary(run_parts(__file__, list(args.parts), args, caps, extra))


if __name__ == "__main__":
    main()
