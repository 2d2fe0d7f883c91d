"""Shared by upernet_step.py and maskformer_step.py: forward+backward time and peak memory per
image at crop 480 on the CPU (each model in its own process, so its peak RSS is its own; the
same torch thread count for every model), and parameter counts.

Run directly: ``python benchmarks/model_step.py --child FAMILY SIZE STEPS`` (internal).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
THREADS = 2
CROP = 480
BATCH = 2
NUM_CLASSES = 124

TINY_BACKBONE = {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]}
SIZES = {
    "tiny": {"backbone": "swin_tiny_patch4_window7_224", "backbone_kwargs": TINY_BACKBONE,
             "channels": 64, "aux_channels": 32, "num_queries": 16, "hidden_dim": 64,
             "mask_dim": 64, "dec_layers": 2, "nheads": 4, "dim_feedforward": 128},
    "swin_t": {"backbone": "swin_tiny_patch4_window7_224"},
    "swin_l": {"backbone": "swin_large_patch4_window12_384", "backbone_kwargs": {"window_size": 12}},
}


def _child(family: str, size: str, steps: int) -> None:
    import resource
    import time

    import torch

    from vspw_ray.config import config_from_dict
    from vspw_ray.models import build_model

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = config_from_dict({"name": "bench", "model": {"family": family, **SIZES[size]}})
    model = build_model(cfg, NUM_CLASSES)
    params = sum(p.numel() for p in model.parameters())
    if steps == 0:
        print(json.dumps({"params": params}))
        return
    x = torch.randn(BATCH, 3, CROP, CROP)
    y = torch.randint(0, NUM_CLASSES, (BATCH, CROP, CROP))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t = time.perf_counter()
        sum(model(x, y).values()).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"params": params, "s_per_image": min(times[1:]) / BATCH, "peak_rss_mb": rss}))


def measure(family: str, size: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", family, size, str(steps)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_report(family: str, published_params_m: float) -> list[tuple]:
    """Measure tiny and Swin-T steps and the Swin-L size; print a summary; return metric rows."""
    tiny, swin_t, swin_l = (measure(family, "tiny", 3), measure(family, "swin_t", 2),
                            measure(family, "swin_l", 0))
    print(f"{family}: crop {CROP}, batch {BATCH}, torch threads {THREADS}, {NUM_CLASSES} classes")
    for name, r in (("tiny", tiny), ("swin_t", swin_t)):
        print(f"  {name}: {r['params'] / 1e6:.1f}M params, {r['s_per_image']:.2f} s/image fwd+bwd, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"  swin_l: {swin_l['params'] / 1e6:.1f}M params (published: ~{published_params_m:.0f}M)")
    return [
        (f"tiny_{family}_fwd_bwd_s_per_image", tiny["s_per_image"], None, "s"),
        (f"tiny_{family}_peak_rss", tiny["peak_rss_mb"], None, "MB"),
        (f"swin_t_{family}_fwd_bwd_s_per_image", swin_t["s_per_image"], None, "s"),
        (f"swin_t_{family}_peak_rss", swin_t["peak_rss_mb"], None, "MB"),
        (f"swin_l_{family}_params", swin_l["params"] / 1e6, published_params_m, "M"),
    ]


def print_metrics(rows: list[tuple]) -> None:
    for metric, value, target, unit in rows:
        print(json.dumps({"metric": metric, "value": round(value, 4), "target": target, "unit": unit}))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
