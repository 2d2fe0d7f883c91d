"""MaskFormer: forward+backward time and peak memory per image at crop 480 on this CPU for the
tiny and Swin-T models, Hungarian matcher time per image at 100 queries (cost + assignment, 124
classes, 20 target masks at stride 4 of a 480 crop), and MaskFormer Swin-L's parameter count next
to the published ~212M."""

import time

import torch
from model_step import THREADS, print_metrics, step_report

from vspw_ray.models.maskformer import hungarian_match, match_cost


def matcher_seconds(repeats: int = 10) -> float:
    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    q, c, t, pixels = 100, 124, 20, 120 * 120
    logits = torch.randn(q, c + 1, generator=g)
    masks = torch.randn(q, pixels, generator=g)
    labels = torch.randperm(c, generator=g)[:t]
    targets = (torch.rand(t, pixels, generator=g) > 0.9).float()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        hungarian_match(match_cost(logits, masks, labels, targets))
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    rows = step_report("maskformer", 212)
    seconds = matcher_seconds()
    print(f"  matcher: {seconds * 1000:.1f} ms per image per decoder layer (100 queries, 20 targets)")
    print_metrics(rows + [("matcher_ms_per_image_layer", seconds * 1000, None, "ms")])
