"""Ray Train overhead: steady-state step time of the Ray Train loop with one worker vs the same
``train_steps`` in a plain PyTorch process (same model, data, batch and torch thread count), and
the time from `vspw-ray train` to its first iteration. Prints JSON lines last."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = ROOT / "experiments" / "tiny_synth.yaml"
ITERS, LOG = 60, 10
THREADS = 1  # a Ray Train worker gets one CPU; the plain loop gets the same


def _overrides(root: Path, storage: Path, iters: int = ITERS, log: int = LOG) -> list[str]:
    return [f"data.root={root}", f"storage.path={storage}", f"train.iters={iters}",
            f"train.val_interval={iters}", f"train.log_interval={log}", "train.batch_size=4",
            "data.loader_workers=0", "train.warmup_iters=5"]


def plain_step_seconds(root: Path) -> float:
    import torch

    from vspw_ray.config import load_config
    from vspw_ray.data import load_class_table, split_frames
    from vspw_ray.data.datasets import IterationSampler, TrainDataset
    from vspw_ray.models import build_model
    from vspw_ray.train.loop import build_optimizer, build_scheduler, train_steps

    torch.set_num_threads(THREADS)
    cfg = load_config(EXPERIMENT, _overrides(root, Path("unused")))
    cfg = cfg.__class__(**{**cfg.__dict__, "variants": ()})
    table = load_class_table(root)
    frames = split_frames(root, "train")
    torch.manual_seed(0)
    model = build_model(cfg, table.num_classes)
    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train)
    loader = torch.utils.data.DataLoader(
        TrainDataset(frames, table.num_classes, cfg.data), batch_size=cfg.train.batch_size,
        sampler=IterationSampler(len(frames), cfg.train.batch_size, num_iters=ITERS))
    batches = iter(loader)
    times: list[float] = []
    train_steps(model, opt, sched, batches, ITERS, device=torch.device("cpu"),
                on_step=lambda i, t, s: times.append(s))
    steady = times[LOG:]  # same window as the Ray side: after the first log interval
    return sum(steady) / len(steady)


# where the start-up goes: the first line of each phase in `vspw-ray train`'s output
PHASES = [("ray_started", "local Ray instance"), ("controller_up", "Requesting resources"),
          ("worker_group_starting", "Attempting to start"),
          ("worker_process_up", "Setting up process group"), ("first_iteration", "] it 1/")]


def _busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (every process, every core), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def ray_run(root: Path, storage: Path) -> tuple[float, dict[str, float], float]:
    """(seconds per step after the first log interval, seconds to each start-up phase, CPU
    seconds the machine spent until the first iteration)."""
    cmd = [sys.executable, "-m", "vspw_ray", "train", str(EXPERIMENT), "--variant", "crop96",
           "--torch-threads", str(THREADS), *_overrides(root, storage, log=1)]
    cpu0, start = _busy_cpu_seconds(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    phases, stamps, cpu = {}, {}, float("nan")
    for line in proc.stdout:
        now = time.perf_counter() - start
        for name, pattern in PHASES:
            if pattern in line and name not in phases:
                phases[name] = now
                if name == "first_iteration":
                    cpu = _busy_cpu_seconds() - cpu0
        m = re.search(r"\] it (\d+)/\d+ ", line)
        if m:
            stamps.setdefault(int(m.group(1)), now)
    if proc.wait() != 0:
        raise RuntimeError("vspw-ray train failed")
    step = (stamps[ITERS] - stamps[LOG]) / (ITERS - LOG)
    return step, phases, cpu


def main() -> None:
    from vspw_ray.data.synth import SynthSpec, synthesize

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        synthesize(root, SynthSpec(videos=8, frames=8, classes=8, height=120, width=160))
        plain = plain_step_seconds(root)
        ray_step, phases, cpu = ray_run(root, Path(tmp) / "runs")
        plain_again = plain_step_seconds(root)  # bracket the Ray run: the machine is shared
    plain = min(plain, plain_again)
    first = phases["first_iteration"]
    print(f"torch threads {THREADS}, batch 4, tiny UperNet crop 96x128, {ITERS} iterations")
    print(f"plain loop {plain * 1000:.1f} ms/step; Ray Train loop {ray_step * 1000:.1f} ms/step; "
          f"first iteration after {first:.1f} s")
    print("start-up phases (s since the command): "
          + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(f"the machine's {os.cpu_count()} cores were busy for {cpu:.1f} CPU-s until the first "
          f"iteration ({cpu / first / (os.cpu_count() or 1):.0%} of their capacity)")
    for metric, value, target, unit in [
        ("plain_step_ms", plain * 1000, None, "ms"),
        ("ray_train_step_ms", ray_step * 1000, None, "ms"),
        ("ray_vs_plain_step_ratio", ray_step / plain, 1.05, "ratio"),
        ("cpu_seconds_to_first_iteration", cpu, None, "s"),
        ("time_to_first_iteration", first, 15.0, "s"),
    ]:
        print(json.dumps({"metric": metric, "value": round(value, 3), "target": target, "unit": unit}))


if __name__ == "__main__":
    main()
