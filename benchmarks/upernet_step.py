"""Forward+backward time and peak memory per image at crop 480 on the CPU for the tiny and the
Swin-T UperNet (same torch thread count for both), and the parameter count of Swin-L UperNet
next to the published size (about 234M). Each model runs in its own process so its peak RSS
is its own. Prints JSON lines last.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
sys.path.insert(0, str(ROOT))
CROP = 480
BATCH = 2

MODELS = {
    "tiny": {"backbone": "swin_tiny_patch4_window7_224", "channels": 64, "aux_channels": 32,
             "backbone_kwargs": {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8]}},
    "swin_t": {"backbone": "swin_tiny_patch4_window7_224", "channels": 512, "aux_channels": 256},
    "swin_l": {"backbone": "swin_large_patch4_window12_384", "channels": 512, "aux_channels": 256,
               "backbone_kwargs": {"window_size": 12}},
}


def _child(name: str, steps: int) -> None:
    import resource
    import time

    import torch

    from vspw_ray.config import config_from_dict
    from vspw_ray.models import build_model

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = config_from_dict({"name": "bench", "model": MODELS[name]})
    model = build_model(cfg, 124)
    params = sum(p.numel() for p in model.parameters())
    if steps == 0:
        print(json.dumps({"params": params}))
        return
    x = torch.randn(BATCH, 3, CROP, CROP)
    y = torch.randint(0, 124, (BATCH, CROP, CROP))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t = time.perf_counter()
        loss = sum(model(x, y).values())
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"params": params, "s_per_image": min(times[1:]) / BATCH, "peak_rss_mb": rss}))


def _run(name: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", name, str(steps)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    tiny, swin_t, swin_l = _run("tiny", 3), _run("swin_t", 2), _run("swin_l", 0)
    print(f"crop {CROP}, batch {BATCH}, torch threads {THREADS}, 124 classes")
    for name, r in (("tiny", tiny), ("swin_t", swin_t)):
        print(f"{name}: {r['params'] / 1e6:.1f}M params, {r['s_per_image']:.2f} s/image fwd+bwd, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"swin_l: {swin_l['params'] / 1e6:.1f}M params (published Swin-L UperNet: ~234M)")
    for metric, value, target, unit in [
        ("tiny_upernet_fwd_bwd_s_per_image", tiny["s_per_image"], None, "s"),
        ("tiny_upernet_peak_rss", tiny["peak_rss_mb"], None, "MB"),
        ("swin_t_upernet_fwd_bwd_s_per_image", swin_t["s_per_image"], None, "s"),
        ("swin_t_upernet_peak_rss", swin_t["peak_rss_mb"], None, "MB"),
        ("swin_l_upernet_params", swin_l["params"] / 1e6, 234, "M"),
    ]:
        print(json.dumps({"metric": metric, "value": round(value, 3), "target": target, "unit": unit}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
