"""Search efficiency and per-trial overhead of `vspw-ray tune`.

(a) The paper's search space of experiments/swin_l_upernet_search.yaml (crop 480/640, logit adjustment on/off with tau, OHEM on/off with
    its threshold, lr) on a cheap deterministic objective: a learning curve whose plateau
    depends on the parameters (crop 640, tau near 0.1, OHEM near 0.7 and lr near 6e-5 help).
    TPE + ASHA (this package's PruneAwareOptunaSearch and ASHA on the iteration clock) against
    random search without early stopping, through Ray Tune, over several seeds: the best
    full-schedule value found against the trial-iterations spent.
(b) A real sweep of tiny trials on synthetic data: the time each trial spends in Tune and Ray
    Train set-up and teardown versus in its training loop.

    python benchmarks/search_efficiency.py [--trials 40] [--seeds 3] [--real-trials 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vspw_ray.metrics import VAL_A_MIOU  # noqa: E402
from vspw_ray.tune.sweep import TIME_ATTR  # noqa: E402

MAX_T, REPORTS = 1600, 16


def plateau(p: dict) -> float:
    q = 0.50 + 0.02 * (p["data.crop_size"] == [640, 640])
    if p["loss.logit_adjust.enabled"]:
        q += 0.015 - 0.03 * (math.log10(p["loss.logit_adjust.tau"]) + 1) ** 2
    if p.get("loss.ohem.enabled"):
        q += 0.01 - 0.2 * (p["loss.ohem.thresh"] - 0.7) ** 2
    return q - 0.08 * (math.log10(p["train.lr"]) - math.log10(6e-5)) ** 2


def curve(p: dict, it: int) -> float:
    """Deterministic learning curve with per-trial noise that shrinks as training goes on."""
    seed = hashlib.sha256(json.dumps(p, sort_keys=True).encode() + str(it).encode()).digest()
    noise = (int.from_bytes(seed[:4], "little") / 2**32 - 0.5) * 0.01 * (1 - it / MAX_T + 0.2)
    speed = 1.0 + 1.5 * abs(math.log10(p["train.lr"]) - math.log10(3e-4))  # high lr learns faster
    return plateau(p) * (1 - math.exp(-it / (200 * speed))) + noise


def objective(config: dict) -> None:
    import ray.tune

    params = {k: v for k, v in config.items() if k != "optuna_trial"}
    for k in range(1, REPORTS + 1):
        it = k * MAX_T // REPORTS
        ray.tune.report({VAL_A_MIOU: curve(params, it), TIME_ATTR: it})


def run(method: str, seed: int, trials: int, cfg, params) -> list[tuple[int, float | None]]:
    """``(iterations spent, final value or None if stopped)`` per trial, in trial order."""
    import optuna
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from vspw_ray.tune.search import DefineByRun, PruneAwareOptunaSearch

    sampler = (optuna.samplers.TPESampler(seed=seed) if method == "tpe_asha"
               else optuna.samplers.RandomSampler(seed=seed))
    searcher = PruneAwareOptunaSearch(space=DefineByRun(params, _fixed(cfg)), metric=VAL_A_MIOU,
                                      mode="max", sampler=sampler, max_t=MAX_T)
    scheduler = (ASHAScheduler(time_attr=TIME_ATTR, metric=VAL_A_MIOU, mode="max",
                               max_t=MAX_T, grace_period=MAX_T // 8, reduction_factor=3)
                 if method == "tpe_asha" else FIFOScheduler())
    with tempfile.TemporaryDirectory() as d:
        grid = ray.tune.Tuner(
            objective,
            tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                            num_samples=trials, max_concurrent_trials=1),
            run_config=ray.tune.RunConfig(storage_path=d, name=f"{method}_{seed}", verbose=0),
        ).fit()
        rows = []
        for r in grid:
            it = int(r.metrics[TIME_ATTR])
            rows.append((r.config["optuna_trial"], it,
                         r.metrics[VAL_A_MIOU] if it >= MAX_T else None))
    return [(it, v) for _, it, v in sorted(rows)]


def _fixed(cfg) -> dict:
    from vspw_ray.config import to_dict

    return to_dict(cfg)


def best_at(rows: list[tuple[int, float | None]], budget: int) -> float | None:
    spent, best = 0, None
    for it, value in rows:
        spent += it
        if spent > budget:
            break
        if value is not None and (best is None or value > best):
            best = value
    return best


def cheap_objective(trials: int, seeds: int) -> list[dict]:
    import ray

    from vspw_ray.config import load_config
    from vspw_ray.tune.space import validate_space

    # the paper's space, as experiments/swin_l_upernet_search.yaml defines it
    cfg = load_config(ROOT / "experiments" / "swin_l_upernet_search.yaml")
    params = validate_space(cfg)
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    budget = trials * MAX_T  # what random search spends on its trials
    results = {"tpe_asha": [], "random": []}
    for seed in range(seeds):
        for method in results:
            rows = run(method, seed, trials, cfg, params)
            results[method].append(rows)
            spent = sum(it for it, _ in rows)
            print(f"seed {seed} {method:<9} trials {len(rows)}  iterations {spent}  best "
                  f"{max(v for _, v in rows if v is not None):.4f}", flush=True)
    ray.shutdown()
    optimum = _optimum()
    out = []
    for fraction in (0.25, 0.5, 1.0):
        for method, runs in results.items():
            values = [best_at(rows, int(budget * fraction)) for rows in runs]
            regret = sum(optimum - v for v in values if v is not None) / max(
                1, sum(v is not None for v in values))
            out.append({"metric": f"regret_at_{int(fraction * 100)}pct_budget_{method}",
                        "value": round(regret, 4), "target": None, "unit": "mIoU"})
    # how much of random search's budget TPE+ASHA needs to match random's final best
    fractions = []
    for tpe_rows, rnd_rows in zip(results["tpe_asha"], results["random"]):
        target = best_at(rnd_rows, budget)
        spent, hit = 0, None
        for it, value in tpe_rows:
            spent += it
            if value is not None and value >= target:
                hit = spent
                break
        fractions.append(hit / budget if hit else float("inf"))
    out.append({"metric": "tpe_asha_budget_to_match_random_best", "value":
                round(sum(fractions) / len(fractions), 3), "target": "< 1", "unit": "fraction"})
    return out


def _optimum() -> float:
    """Grid maximum of the plateau (full-schedule value) over the space."""
    best = -1.0
    for crop in ([480, 480], [640, 640]):
        for la in (False, True):
            for tau in ([None] if not la else [10 ** (-2 + 2 * i / 40) for i in range(41)]):
                for ohem in (False, True):
                    for th in ([None] if not ohem else [0.5 + 0.4 * i / 40 for i in range(41)]):
                        for i in range(81):  # train.lr over [2e-5, 2e-4]
                            p = {"data.crop_size": crop, "loss.logit_adjust.enabled": la,
                                 "loss.logit_adjust.tau": tau, "loss.ohem.enabled": ohem,
                                 "loss.ohem.thresh": th, "train.lr": 2e-5 * 10 ** (i / 80)}
                            p = {k: v for k, v in p.items() if v is not None}
                            best = max(best, curve(p, MAX_T))
    return best


def real_overhead(trials: int) -> list[dict]:
    """A real sweep of tiny trials: Tune's trial wall time vs the worker's time in its loop."""
    import csv
    import subprocess

    from vspw_ray.config import config_from_dict, dump_yaml, load_config, to_dict
    from vspw_ray.data.stats import class_stats, write_stats
    from vspw_ray.data.synth import SynthSpec, synthesize

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "synth"
        synthesize(root, SynthSpec(videos=8, frames=12, classes=6, height=64, width=80, seed=3),
                   processes=1)
        prior = write_stats(class_stats(root, "train", processes=1), Path(d) / "stats")["prior"]
        data = to_dict(load_config(ROOT / "experiments" / "tiny_synth.yaml", [
            f"data.root={root}", f"storage.path={Path(d) / 'runs'}",
            f"loss.logit_adjust.prior={prior}", "train.batch_size=2", "data.loader_workers=0",
            "train.log_interval=10", "train.max_failures=0"]))
        data["variants"] = []
        data["tune"].update(num_samples=trials, iters=40, grace_period=20, reduction_factor=2,
                            max_concurrent_trials=1)
        path = Path(d) / "sweep.yaml"
        path.write_text(dump_yaml(config_from_dict(data)))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vspw_ray", "tune", str(path), "--no-track"],
                       check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        rows = list(csv.DictReader(next((Path(d) / "runs" / "tune").glob("*/trials.csv")).open()))
    # Tune's wall time of each trial vs the time its Train worker spent from start to last report
    in_loop = sum(float(r["worker_s"]) for r in rows)
    total = sum(float(r["trial_s"]) for r in rows)
    print(f"real sweep: {len(rows)} trials in {wall:.0f} s; per trial {total / len(rows):.1f} s "
          f"wall, {in_loop / len(rows):.1f} s in the worker's loop", flush=True)
    return [{"metric": "trial_setup_overhead_per_trial",
             "value": round((total - in_loop) / len(rows), 1), "target": None, "unit": "s"},
            {"metric": "trial_time_in_training_loop", "value": round(in_loop / total, 3),
             "target": None, "unit": "fraction"},
            {"metric": "sweep_wall_per_trial", "value": round(wall / len(rows), 1),
             "target": None, "unit": "s"}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--real-trials", type=int, default=3)
    args = parser.parse_args()
    lines = cheap_objective(args.trials, args.seeds)
    if args.real_trials:
        lines += real_overhead(args.real_trials)
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
