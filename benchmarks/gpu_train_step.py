"""GPU training-step throughput without Ray: eager vs compiled (``train.compile``), both model
families, through the project's own ``vspw_ray.train.loop.train_steps`` and ``forward_loss``.

Each part runs in its own process under a time cap (a Swin-L compile alone took 178 s on an
H200) and prints one JSON line when it ends, flushed: images/s, TFLOP per image (counted by
``torch.utils.flop_counter.FlopCounterMode`` on a real eager step), MFU against the chip's
dense bf16 peak, peak memory, seconds of the first (compiling) step, graphs compiled after
warm-up (0: no recompiles) and the graph breaks dynamo reported. Imports are checked first.
The last lines are the repository's ``{"metric", "value", "target", "unit"}`` records.

Usage::

    python benchmarks/gpu_train_step.py                 # Swin-L, crop 640, batch 8, bf16
    python benchmarks/gpu_train_step.py --tiny          # tiny models on the CPU, < 2 minutes
    python benchmarks/gpu_train_step.py --parts upernet_compiled --budget 300

Also ``--tests``: first run the ``gpu``-marked tests (tests/test_gpu_paths.py) as a capped part.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Dense bf16 peak (TFLOP/s) by device name, as the MFU figures use.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
FAMILIES = ("upernet", "maskformer")
NEEDED = ("torch", "timm", "numpy", "scipy", "yaml", "vspw_ray.config", "vspw_ray.models",
          "vspw_ray.train.loop")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def check_imports(modules=NEEDED) -> bool:
    """One JSON line: versions, the device, and every module that does not import."""
    missing, versions = {}, {}
    for name in modules:
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", None)
        except Exception as err:  # noqa: BLE001 - report whatever stops the import
            missing[name] = f"{type(err).__name__}: {err}"
    record = {"part": "imports", "ok": not missing, "missing": missing,
              "versions": {k: v for k, v in versions.items() if v}}
    if "torch" in versions:
        import torch

        record["cuda"] = torch.cuda.is_available()
        record["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    emit(record)
    return not missing


def peak_tflops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_gib(device) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS


def run_parts(script: str, parts: list[str], args: argparse.Namespace, caps: dict[str, float],
              extra: list[str]) -> list[dict]:
    """Each part in a child process (``script --child PART``) under its cap and what is left of
    ``--budget``; the child's JSON lines pass through as they come, a timeout is a line too."""
    records, deadline = [], time.monotonic() + args.budget
    for part in parts:
        left = deadline - time.monotonic()
        cap = min(caps.get(part, args.part_seconds), left)
        if cap < 10:
            emit({"part": part, "skipped": f"budget of {args.budget:.0f} s spent"})
            continue
        cmd = [sys.executable, script, "--child", part, "--part-seconds", str(cap), *extra]
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cap + 30)
        except subprocess.TimeoutExpired:
            emit({"part": part, "error": f"timed out after {cap + 30:.0f} s"})
            continue
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        for line in lines:
            print(line, flush=True)
            records.append(json.loads(line))
        if done.returncode:
            emit({"part": part, "error": f"exit {done.returncode}",
                  "stderr_tail": done.stderr[-1500:]})
    return records


def model_config(family: str, tiny: bool, crop: int, batch: int):
    from model_step import SIZES

    from vspw_ray.config import config_from_dict

    return config_from_dict({"name": "bench",
                             "model": {"family": family, **SIZES["tiny" if tiny else "swin_l"]},
                             "data": {"crop_size": [crop, crop]},
                             "train": {"batch_size": batch, "iters": 1000, "warmup_iters": 10}})


def make_batch(batch: int, crop: int, num_classes: int) -> dict:
    """Normalised noise and block-structured labels (about 20 classes per crop, some void), in
    pinned memory where a GPU is, as the trainer's loader hands them over."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, num_classes, (batch, 1, 5, 5), generator=g).float()
    mask = F.interpolate(coarse, size=(crop, crop), mode="nearest")[:, 0].long()
    mask[:, : crop // 10] = 255
    out = {"image": torch.randn(batch, 3, crop, crop, generator=g), "mask": mask}
    if torch.cuda.is_available():
        out = {k: v.pin_memory() for k, v in out.items()}
    return out


def flops_per_image(model, batch: dict, device, autocast) -> float:
    """FLOPs of one eager forward+backward (the same math the compiled step runs), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    images, targets = batch["image"][:2].to(device), batch["mask"][:2].to(device)
    with FlopCounterMode(display=False) as counter:
        with autocast:
            losses = model(images, targets)
        sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / images.shape[0]


def _timed_steps(model, forward, cfg, batch, device, autocast, scaler, cap_s: float,
                 max_steps: int = 20) -> dict:
    """First (compiling) step, two warm-up steps, then steps until ``cap_s`` or ``max_steps``;
    one sync per phase (the step itself never waits for the device)."""
    import itertools

    from torch._dynamo.utils import counters

    from vspw_ray.train.loop import build_optimizer, build_scheduler, train_steps

    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    batches = itertools.repeat(batch)

    def run(n: int) -> float:
        start = time.perf_counter()
        terms = train_steps(model, optimizer, scheduler, batches, n, device=device,
                            autocast=autocast, scaler=scaler, forward=forward)
        float(terms["loss"])  # waits for the device
        return time.perf_counter() - start

    start = time.perf_counter()
    first = run(1)
    run(2)
    graphs = counters["stats"]["unique_graphs"]
    steps, elapsed = 0, 0.0
    while steps < 2 or (steps < max_steps and time.perf_counter() - start + elapsed / steps < cap_s):
        elapsed += run(1 if steps < 2 else 2)
        steps += 1 if steps < 2 else 2
    return {"first_step_s": round(first, 2), "steps": steps, "step_s": elapsed / max(steps, 1),
            "graphs_after_warmup": counters["stats"]["unique_graphs"] - graphs,
            "graph_breaks": sorted({str(k).splitlines()[0][:120] for k in counters["graph_break"]})}


def train_part(part: str, args: argparse.Namespace) -> None:
    import torch

    from vspw_ray.models import build_model
    from vspw_ray.precision import autocast_context
    from vspw_ray.train.loop import forward_loss

    family, mode = part.split("_")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread: no OpenMP contention on a shared CPU
    torch.manual_seed(0)
    cfg = model_config(family, args.tiny, args.crop, args.batch)
    model = build_model(cfg, args.classes).to(device)
    autocast, scaler = autocast_context(device, "auto")
    batch = make_batch(args.batch, args.crop, args.classes)
    flops = flops_per_image(model, batch, device, autocast)
    # on the CPU dynamo's graphs run eagerly: the plumbing is checked in seconds (the unit
    # test compiles with aot_eager, a CPU inductor build of even the tiny model takes minutes)
    backend = args.backend or ("inductor" if device.type == "cuda" else "eager")
    forward = forward_loss(model, compile=mode == "compiled", backend=backend)
    timing = _timed_steps(model, forward, cfg, batch, device, autocast, scaler, args.part_seconds,
                          max_steps=6 if args.tiny else 20)
    img_s = args.batch / timing.pop("step_s")
    peak = peak_tflops(device)
    emit({"part": part, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
          "backend": backend if mode == "compiled" else None, "batch": args.batch,
          "crop": args.crop, "img_per_s": round(img_s, 2), "tflop_per_img": round(flops / 1e12, 4),
          "mfu": round(flops * img_s / (peak * 1e12), 4) if peak else None,
          "peak_mem_gib": round(peak_memory_gib(device), 2), **timing})


def gpu_tests_part(args: argparse.Namespace) -> None:
    """The ``gpu``-marked tests, one line with their outcome."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/test_gpu_paths.py"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]
    emit({"part": "gpu_tests", "ok": done.returncode == 0, "summary": tail,
          "failures": [ln for ln in done.stdout.splitlines() if ln.startswith("FAILED")]})


def summary(records: list[dict]) -> None:
    """The repository's metric lines; targets from issue 18 (UperNet MFU >= 25 %, MaskFormer
    img/s >= UperNet's, both compiled); null where a part did not run."""
    by_part = {r["part"]: r for r in records if "img_per_s" in r}
    upernet = by_part.get("upernet_compiled", {}).get("img_per_s")
    for part, r in by_part.items():
        emit({"metric": f"{part}_img_per_s", "value": r["img_per_s"],
              "target": upernet if part == "maskformer_compiled" else None, "unit": "img/s"})
        emit({"metric": f"{part}_mfu", "value": r["mfu"],
              "target": 0.25 if part == "upernet_compiled" else None, "unit": "fraction"})


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models, crop 64, batch 2")
    p.add_argument("--parts", nargs="*", default=[f"{f}_{m}" for f in FAMILIES
                                                  for m in ("eager", "compiled")])
    p.add_argument("--tests", action="store_true", help="run the gpu-marked tests first")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("--classes", type=int, default=124)
    p.add_argument("--backend", default=None, help="inductor on CUDA, eager on the CPU")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all parts")
    p.add_argument("--part-seconds", type=float, default=None, help="cap of each part")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch = args.batch or (2 if args.tiny else 8)
    args.crop = args.crop or (64 if args.tiny else 640)
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        gpu_tests_part(args) if args.child == "gpu_tests" else train_part(args.child, args)
        return
    if not check_imports():
        sys.exit(1)
    parts = (["gpu_tests"] if args.tests else []) + list(args.parts)
    # compiles get the most; the issue measured 178 s for Swin-L UperNet's
    caps = {p: (args.part_seconds or (25 if args.tiny else 240 if "compiled" in p else 60))
            for p in parts}
    caps["gpu_tests"] = args.part_seconds or 150
    extra = [f"--{k}={v}" for k, v in (("batch", args.batch), ("crop", args.crop),
                                       ("classes", args.classes)) if v is not None]
    extra += ["--tiny"] if args.tiny else []
    extra += [f"--backend={args.backend}"] if args.backend else []
    summary(run_parts(__file__, parts, args, caps, extra))


if __name__ == "__main__":
    main()
