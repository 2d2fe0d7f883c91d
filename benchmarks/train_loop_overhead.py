"""Ray Train overhead: steady-state step time of the Ray Train loop with one worker vs the same
``train_steps`` in a plain PyTorch process (same model, data, batch and torch thread count), and
the time from `vspw-ray train` to its first iteration. Prints JSON lines last.

The Ray side's step time comes from the worker's own clock: the MLflow timestamps of its
`train/loss` records at iterations LOG and ITERS (the progress logging every LOG iterations
included, as in a real run), not from when the lines reach the driver's console. The start-up
is timed on a second, two-iteration run that prints every iteration."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = ROOT / "experiments" / "tiny_synth.yaml"
ITERS, LOG = 110, 10  # steady windows: iterations 11-20, 21-30, ..., 101-110
THREADS = 1  # a Ray Train worker gets one CPU; the plain loop gets the same


def _overrides(root: Path, storage: Path, iters: int = ITERS, log: int = LOG) -> list[str]:
    return [f"data.root={root}", f"storage.path={storage}", f"train.iters={iters}",
            f"train.val_interval={iters}", f"train.log_interval={log}", "train.batch_size=4",
            "data.loader_workers=0", "train.warmup_iters=5"]


def plain_step_seconds(root: Path) -> list[float]:
    """Mean seconds per step of each LOG-iteration window after the first (and the CPU-seconds
    per step of the training thread over them, appended to PLAIN_CPU)."""
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
    cpu: list[float] = [time.thread_time()]
    train_steps(model, opt, sched, batches, ITERS, device=torch.device("cpu"),
                on_step=lambda i, t, s: (times.append(s), cpu.append(time.thread_time())))
    PLAIN_CPU.append((cpu[ITERS] - cpu[CPU_FROM]) / (ITERS - CPU_FROM))
    return [sum(times[i:i + LOG]) / LOG for i in range(LOG, ITERS, LOG)]


# CPU per step is counted from the second log on: the worker's first MLflow record sets up
# its client (~1 s of CPU) right after the first log line
CPU_FROM = 2 * LOG
PLAIN_CPU: list[float] = []  # CPU-seconds per step of iterations CPU_FROM+1..ITERS, each plain run


def _worker_cpu_seconds() -> float:
    """CPU time of the (one) Ray Train worker process running now, from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if b"ray::RayTrainWorker" in (stat.parent / "cmdline").read_bytes():
                fields = stat.read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return float("nan")


# where the start-up goes: the first line of each phase in `vspw-ray train`'s output
PHASES = [("ray_started", "local Ray instance"), ("controller_up", "Requesting resources"),
          ("worker_group_starting", "Attempting to start"),
          ("worker_process_up", "Setting up process group"), ("first_iteration", "] it 1/")]


def _busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (every process, every core), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _run_cli(root: Path, storage: Path, iters: int, log: int) -> tuple[list[tuple[float, str]], float]:
    """Run `vspw-ray train`; (seconds since the command, line) for each output line, and the
    CPU-seconds the machine spent until the first iteration."""
    cmd = [sys.executable, "-m", "vspw_ray", "train", str(EXPERIMENT), "--variant", "crop96",
           "--torch-threads", str(THREADS), *_overrides(root, storage, iters=iters, log=log)]
    cpu0, start = _busy_cpu_seconds(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    lines, cpu = [], float("nan")
    for line in proc.stdout:
        lines.append((time.perf_counter() - start, line))
        m = re.search(r"\] it (\d+)/\d+ ", line)
        if m and cpu != cpu:
            cpu = _busy_cpu_seconds() - cpu0
        if m and int(m.group(1)) in (CPU_FROM, ITERS):
            WORKER_CPU[int(m.group(1))] = _worker_cpu_seconds()
    if proc.wait() != 0:
        raise RuntimeError("vspw-ray train failed:\n" + "".join(text for _, text in lines[-30:]))
    return lines, cpu


WORKER_CPU: dict[int, float] = {}  # iteration -> the worker's CPU-seconds when its line came


def startup(root: Path, storage: Path) -> tuple[dict[str, float], float]:
    """Seconds from the command to each start-up phase; CPU-seconds until the first iteration."""
    lines, cpu = _run_cli(root, storage, iters=2, log=1)
    phases: dict[str, float] = {}
    for now, line in lines:
        for name, pattern in PHASES:
            if pattern in line and name not in phases:
                phases[name] = now
    return phases, cpu


def ray_step_seconds(root: Path, storage: Path) -> list[float]:
    """Mean seconds per step of each LOG-iteration window after the first of a Ray Train run,
    by the worker's MLflow records (one every LOG iterations)."""
    from mlflow.tracking import MlflowClient

    lines, _ = _run_cli(root, storage, iters=ITERS, log=LOG)
    run_id = next(line.split()[-1] for _, line in lines if line.startswith("MLflow run:"))
    history = MlflowClient(f"sqlite:///{storage.resolve()}/mlflow.db").get_metric_history(
        run_id, "train/loss")
    stamp = {m.step: m.timestamp / 1000 for m in history}
    return [(stamp[i + LOG] - stamp[i]) / LOG for i in range(LOG, ITERS, LOG)]


def main() -> None:
    from vspw_ray.data.synth import SynthSpec, synthesize

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        synthesize(root, SynthSpec(videos=8, frames=8, classes=8, height=120, width=160))
        plain = plain_step_seconds(root)
        ray_windows = ray_step_seconds(root, Path(tmp) / "runs")
        phases, cpu = startup(root, Path(tmp) / "runs_startup")
        plain += plain_step_seconds(root)  # bracket the Ray runs: the machine is shared
    # medians of 10-iteration windows on both sides: a busy moment of this shared machine
    # moves a window, not the figure
    plain_step, ray_step = statistics.median(plain), statistics.median(ray_windows)
    # CPU-seconds per step (the worker process vs the plain loop's thread): what the loop costs,
    # whatever else the shared machine is doing
    ray_cpu = (WORKER_CPU[ITERS] - WORKER_CPU[CPU_FROM]) / (ITERS - CPU_FROM)
    plain_cpu = statistics.median(PLAIN_CPU)
    first = phases["first_iteration"]
    print(f"torch threads {THREADS}, batch 4, tiny UperNet crop 96x128, iterations {LOG + 1}-{ITERS}")
    print(f"window means, ms/step: plain {[round(x * 1000) for x in plain]}; "
          f"Ray Train {[round(x * 1000) for x in ray_windows]}")
    print(f"plain loop {plain_step * 1000:.1f} ms/step; Ray Train loop {ray_step * 1000:.1f} ms/step "
          f"(progress logged every {LOG}); first iteration after {first:.1f} s")
    print(f"CPU per step: plain {plain_cpu * 1000:.1f} ms, Ray Train worker {ray_cpu * 1000:.1f} ms "
          f"(ratio {ray_cpu / plain_cpu:.3f})")
    print("start-up phases (s since the command): "
          + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print(f"the machine's {os.cpu_count()} cores were busy for {cpu:.1f} CPU-s until the first "
          f"iteration ({cpu / first / (os.cpu_count() or 1):.0%} of their capacity)")
    for metric, value, target, unit in [
        ("plain_step_ms", plain_step * 1000, None, "ms"),
        ("ray_train_step_ms", ray_step * 1000, None, "ms"),
        ("ray_vs_plain_cpu_per_step_ratio", ray_cpu / plain_cpu, None, "ratio"),
        ("ray_vs_plain_step_ratio", ray_step / plain_step, 1.05, "ratio"),
        ("cpu_seconds_to_first_iteration", cpu, None, "s"),
        ("time_to_first_iteration", first, 15.0, "s"),
    ]:
        print(json.dumps({"metric": metric, "value": round(value, 3), "target": target, "unit": unit}))


if __name__ == "__main__":
    main()
