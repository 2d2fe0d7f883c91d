"""Ensemble weight search over the score store: the one-pass grid against a plain pass and a
naive per-point re-read, its memory, the pixel sample's cost, and the store's fidelity at VSPW
size.

* **Grid store**: a synthetic VSPW-layout set (``vspw_ray.data.synth``; VSPW's 124 classes,
  3 val videos of 8 frames at 180x320) and 6 members in groups strong / weak / aux of 2 each,
  written through the real ``ScoreStore`` with the default encoding. Member scores imitate a
  segmentation head: logits at 1/4 resolution (the true class's share of each 4x4 block times a
  skill, plus smooth noise shared by all members and each member's own), bilinear upsampling,
  softmax; single members reach about 85-92 % pixel accuracy.
* **Grid vs plain pass**: ``grid_search_store`` over 21 x 21 points (weights 0..2 step 0.1)
  against one plain pass that only reads and decodes every member's scores of every frame;
  both run twice, alternating, and the faster run of each counts (other jobs on a shared
  machine slow either at random). The naive path re-reads, decodes, forms group means, fuses
  (torch), takes the argmax and scores, once per point; it is timed on ``--naive-points``
  points, checked to give the grid's matrices there, and extrapolated per point to all 441.
  One process each, ``--threads`` torch threads (default 1: the grid scales by sharding videos
  over processes or Ray tasks, which run one thread each, so per core is the deployed
  comparison; at 2 threads the plain pass's torch decode also uses the second core while the
  grid's numpy scoring does not, and the ratio swings 2.3-3.1 with other load).
* **Memory**: peak RSS of a grid run in a fresh process with 2 and with 8 frames per video
  (1x and 4x) above the RSS after imports, with glibc returning freed arrays over 1 MB to the
  system (the default allocator's total peaks are printed and reported beside).
* **Cross-fitted grid with candidates**: what ``vspw-ray ensemble`` does with the default
  ``selection: crossfit``: the grid on fold A and on fold B (one pass each, together one pass
  over the videos), then every fit's best 3 points, each member alone and the plain mean
  rescored on every pixel in one more pass, and each fit's exact choice; against the plain pass
  (target: at most 4x, i.e. at most one more read-and-decode pass than the grid alone). Run
  twice and the faster run counts, as for the grid (consecutive runs differ by up to ~10 %
  on this machine).
* **Sample**: time of one ``sample_miou`` on a pixel sample of the same frames (rate 0.2 of the
  contested pixels) and its gap to the grid's mIoU at the grid's best point.
* **Tune**: the ensemble's own ``run_tuner`` (Ray Tune + OptunaSearch, seeded TPE, SQLite
  study, function trainable, ``reuse_actors``, 2 concurrent) for ``--tune-trials`` trials on
  the pixel sample, against a bare ``study.optimize`` loop with the same sampler, storage kind
  and trial count on the same sample (trials/s each, Ray's start excluded); Tune's best weights
  re-scored on every pixel against the grid's best (3 groups: 2 free weights).
* **Fidelity at VSPW size**: 124 classes at 853x480 (Voronoi label maps), 6 members
  (2 + 2 + 2), fused with the seed's weights (1.4, 1.0): mIoU of the fusion of
  encoded-then-decoded scores against the same fusion of the dense scores, the same with the
  encoding at full resolution (which separates the 1/4 resolution from top-k and quantisation),
  and Parquet bytes per member-frame against dense fp16.

    python benchmarks/ensemble_search.py [--threads 1] [--naive-points 2] [--fidelity-frames 4]
        [--tune-trials 48]

Prints JSON lines last: {"metric", "value", "target", "unit"}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = {"strong": ["m0", "m1"], "weak": ["m2", "m3"], "aux": ["m4", "m5"]}
MEMBERS = [m for ms in GROUPS.values() for m in ms]
SKILLS = [4.0, 3.8, 3.6, 3.5, 3.7, 3.4]  # single members: ~85-92 % pixel accuracy
CLASSES, HEIGHT, WIDTH = 124, 180, 320
WHITE = 0.1


def smooth_noise(shape: tuple[int, int, int], std: float, gen):
    """Per-class noise ``[C, h, w]`` at 1/4 resolution that is smooth over ~8 of its pixels
    (errors of a segmentation model come in regions, not salt and pepper), plus a little
    white noise."""
    import torch
    import torch.nn.functional as F

    c, h, w = shape
    coarse = torch.randn((1, c, (h + 7) // 8 + 1, (w + 7) // 8 + 1), generator=gen)
    field = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    return std * field + WHITE * std * torch.randn(shape, generator=gen)


def member_probs(gt, num_classes: int, noise, skill: float):
    """Probabilities ``[C, H, W]`` like a segmentation head's: logits at 1/4 resolution
    (``skill`` times each class's share of the 4x4 block, plus ``noise [C, H/4, W/4]``),
    bilinear upsampling, softmax. ``gt [H, W]`` reduced ids (255: no class)."""
    import torch
    import torch.nn.functional as F

    h, w = gt.shape
    onehot = F.one_hot(torch.from_numpy(gt.astype(np.int64)), 256)[..., :num_classes]
    share = F.interpolate(onehot.permute(2, 0, 1)[None].float(), size=noise.shape[1:],
                          mode="area")[0]
    logits = skill * share + noise
    return F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0].softmax(0)


def write_store(store_uri: str, root: Path, split: str, num_classes: int, members: list[str],
                skills: list[float], seed: int = 0) -> None:
    import torch

    from vspw_ray.data import label_lut, list_frames, read_mask, read_split
    from vspw_ray.scores import ScoreEncoding, ScoreStore, encode
    from vspw_ray.scores.encoding import scaled_size

    store, enc, lut = ScoreStore(store_uri), ScoreEncoding(), label_lut(num_classes)
    gen = torch.Generator().manual_seed(seed)
    for m in members:
        store.write_manifest(m, {"num_classes": num_classes, "encoding": {"params": enc.to_dict()}})
    for video in read_split(root, split):
        rows = {m: [] for m in members}
        for frame in list_frames(root, video):
            gt = read_mask(frame, lut)
            shape = (num_classes, *scaled_size(*gt.shape, 0.25))
            shared = smooth_noise(shape, 1.0, gen)
            for m, skill in zip(members, skills):
                probs = member_probs(gt, num_classes, shared + smooth_noise(shape, 0.8, gen), skill)
                e = encode(probs, enc)
                rows[m].append({"video": video, "frame": frame.name, "height": e.height,
                                "width": e.width, "score_height": e.classes.shape[1],
                                "score_width": e.classes.shape[2], "classes": e.classes.tobytes(),
                                "codes": e.codes.tobytes()})
        for m in members:
            store.write_video(m, split, video, rows[m])


def build(tmp: Path, frames: int) -> tuple[Path, str]:
    from vspw_ray.data.synth import SynthSpec, synthesize

    root = tmp / f"data_{frames}"
    synthesize(root, SynthSpec(videos=5, frames=frames, classes=CLASSES, height=HEIGHT,
                               width=WIDTH, seed=1, val_fraction=0.6, test_fraction=0.2),
               processes=2)
    store = str(tmp / f"store_{frames}")
    write_store(store, root, "val", CLASSES, MEMBERS, SKILLS)
    return root, store


def plain_pass(store: str, videos: list[str]) -> int:
    """One plain read-and-decode pass: every member's scores of every frame read and decoded
    to the frame's size (nothing scored). Returns the frame count."""
    from vspw_ray.scores import ScoreStore, decode

    scores, frames = ScoreStore(store), 0
    encodings = {m: scores.encoding(m) for m in MEMBERS}
    for batch in scores.read_aligned(MEMBERS, "val", batch_frames=8, videos=videos):
        for i in range(len(batch.keys)):
            for m in MEMBERS:
                decode(batch.scores[m][i], CLASSES, encodings[m])
            frames += 1
    return frames


def naive_point(store: str, root: Path, videos: list[str], weights) -> np.ndarray:
    """One grid point the naive way: read, decode, group means, fuse (torch), argmax, score."""
    import torch

    from vspw_ray.ensemble.core.fusion import fuse_arrays
    from vspw_ray.ensemble.core.grid import group_frames
    from vspw_ray.metrics import confusion

    cm = np.zeros((CLASSES, CLASSES), np.int64)
    for _, _, scores, raw in group_frames(store, "val", str(root), videos, GROUPS):
        fused = fuse_arrays([torch.from_numpy(s) for s in scores], weights)
        cm += confusion(fused.argmax(0).numpy().astype(np.uint8), raw, CLASSES, raw=True)
    return cm


def contested_share(store: str, root: Path, videos: list[str], points) -> float:
    """Share of valid pixels whose label differs between grid points (per-point work)."""
    from vspw_ray.data import label_lut, reduce_mask
    from vspw_ray.ensemble.core.grid import GridConfusions, group_frames

    acc, lut = GridConfusions(points, CLASSES), label_lut(CLASSES)
    for _, _, scores, raw in group_frames(store, "val", str(root), videos, GROUPS):
        acc.add_frame(scores, reduce_mask(raw, lut))
    return 1 - acc.common.sum() / acc.total()[0].sum()


def memory_child(store: str, root: str) -> None:
    """Run in a fresh process: RSS after imports, then the peak over one grid run (MB)."""
    from vspw_ray.data import read_split
    from vspw_ray.ensemble.core.grid import grid_axis, grid_search_store, make_grid

    def status(key: str) -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) / 1024

    before = status("VmRSS:")
    axis = grid_axis(0, 2, 0.1)
    grid_search_store(store, GROUPS, "val", read_split(root, "val"), root,
                      make_grid([axis, axis]), processes=1)
    print(json.dumps({"after_imports_mb": before, "peak_mb": status("VmHWM:")}))


def peak_memory(store: str, root: Path, fixed_mmap: bool) -> dict:
    """Peak RSS of a grid run in a fresh process. ``fixed_mmap``: glibc returns every freed
    array over 1 MB to the system (``MALLOC_MMAP_THRESHOLD_``), so the peak shows what is live
    rather than how much the heap happened to cache (which varies by +-50 MB run to run)."""
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(1 << 20)} if fixed_mmap else {})}
    out = subprocess.run([sys.executable, __file__, "--memory-child", store, str(root)],
                         capture_output=True, text=True, check=True, cwd=ROOT, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def vspw_labels(rng, h: int, w: int, c: int) -> np.ndarray:
    """A VSPW-sized reduced label map: Voronoi regions of Zipf-distributed classes, void (255)
    on region borders."""
    seeds = rng.integers(0, [h, w], size=(24, 2))
    classes = rng.choice(c, size=24, p=(p := 1 / np.arange(1, c + 1) ** 0.6) / p.sum())
    yy, xx = np.mgrid[0:h, 0:w]
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    order = np.argsort(d, axis=-1)
    near, second = order[..., 0], order[..., 1]
    gap = np.take_along_axis(d, second[..., None], -1)[..., 0] - np.take_along_axis(d, near[..., None], -1)[..., 0]
    labels = classes[near].astype(np.uint8)
    labels[gap < 40] = 255
    return labels


def fidelity(frames: int) -> dict:
    """Fused mIoU at VSPW size from dense scores, from the store's encoding (Parquet bytes
    counted) and, to tell resolution from top-k and quantisation, from the same encoding at
    full resolution."""
    import torch

    from vspw_ray.ensemble.core.fusion import fuse_arrays
    from vspw_ray.metrics import ConfusionMatrix, mean_iou
    from vspw_ray.scores import ScoreEncoding, ScoreStore, decode, encode
    from vspw_ray.scores.encoding import scaled_size

    c, h, w, weights = 124, 480, 853, (1.4, 1.0)
    variants = {"dense": None, "store": ScoreEncoding(), "full_res": ScoreEncoding(scale=1.0)}
    cms = {v: ConfusionMatrix(c) for v in variants}
    rng, gen, stored_bytes = np.random.default_rng(0), torch.Generator().manual_seed(0), 0
    with tempfile.TemporaryDirectory() as tmp:
        store = ScoreStore(tmp)
        for f in range(frames):
            gt = vspw_labels(rng, h, w, c)
            shape = (c, *scaled_size(h, w, 0.25))
            shared = smooth_noise(shape, 1.0, gen)
            sums = {v: [None] * 3 for v in variants}  # groups of members 0-1, 2-3, 4-5
            for member, skill in enumerate(SKILLS):
                probs = member_probs(gt, c, shared + smooth_noise(shape, 0.8, gen), skill)
                for v, enc in variants.items():
                    scores = probs
                    if enc is not None:
                        e = encode(probs, enc)
                        if v == "store":
                            stored_bytes += store.write_video(f"m{member}", "val", f"v{f}", [{
                                "video": f"v{f}", "frame": "0", "height": h, "width": w,
                                "score_height": e.classes.shape[1],
                                "score_width": e.classes.shape[2],
                                "classes": e.classes.tobytes(), "codes": e.codes.tobytes()}])
                        scores = decode(e, c, enc)
                    g = member // 2
                    sums[v][g] = scores if sums[v][g] is None else sums[v][g].add_(scores)
            for v, groups in sums.items():  # group sums of 2 members: the means times 2
                pred = fuse_arrays(groups, weights).argmax(0).numpy().astype(np.uint8)
                cms[v].update(pred, gt)
            print(f"  fidelity frame {f + 1}/{frames}", flush=True)
    return {**{v: mean_iou(cm.matrix) for v, cm in cms.items()},
            "classes_present": int((cms["dense"].matrix.sum(1) > 0).sum()),
            "bytes_per_frame": stored_bytes / (frames * len(SKILLS)),
            "dense_fp16_bytes": c * h * w * 2}


def time_grid(store: str, root: Path, naive_points: int) -> dict:
    from vspw_ray.data import read_split
    from vspw_ray.ensemble.core.grid import grid_axis, grid_search_store, make_grid
    from vspw_ray.metrics import mean_iou

    videos = read_split(root, "val")
    axis = grid_axis(0, 2, 0.1)
    points = make_grid([axis, axis])
    plain_pass(store, videos[:1])  # warm caches and lazy imports
    t_plain = t_grid = np.inf
    for _ in range(2):  # alternate and keep the faster of each: other load on the machine varies
        t = time.perf_counter()
        frames = plain_pass(store, videos)
        t_plain = min(t_plain, time.perf_counter() - t)
        t = time.perf_counter()
        grid = grid_search_store(store, GROUPS, "val", videos, str(root), points, processes=1)
        t_grid = min(t_grid, time.perf_counter() - t)
    picks = np.random.default_rng(0).choice(len(points), size=naive_points, replace=False)
    one_one = int(np.flatnonzero(np.isclose(points, (1, 1)).all(1))[0])
    t = time.perf_counter()
    naive = {int(p): naive_point(store, root, videos, tuple(points[p])) for p in picks}
    t_naive = (time.perf_counter() - t) / naive_points
    same = all(np.array_equal(grid[p], m) for p, m in naive.items())
    miou = np.array([mean_iou(m) for m in grid])
    share = contested_share(store, root, videos[:1], points)
    print(f"{frames} frames: plain read+decode pass {t_plain:.2f}s; grid of {len(points)} "
          f"points {t_grid:.2f}s ({t_grid / t_plain:.2f}x); naive {t_naive:.2f}s per point "
          f"({t_naive * len(points):.0f}s extrapolated), same matrices as the grid: {same}; "
          f"contested pixels {100 * share:.1f} %; grid best {points[miou.argmax()].tolist()} "
          f"mIoU {100 * miou.max():.2f}, equal weights {100 * miou[one_one]:.2f}", flush=True)
    return {"plain": t_plain, "grid": t_grid, "naive_point": t_naive, "points": len(points),
            "best": points[miou.argmax()], "best_miou": miou.max(), "videos": videos}


def time_crossfit(store: str, root: Path, videos: list[str], t_plain: float,
                  runs: int = 2) -> dict:
    """The cross-fitted grid as the stage runs it, in this process: the 21 x 21 grid on fold A
    and on fold B (one pass each), the three fits' best 3 points, every member alone and the
    plain mean rescored on every pixel in one more pass, and each fit's exact choice. Run
    ``runs`` times; the fastest counts, as for the grid and the plain pass."""
    timed = [_crossfit_once(store, root, videos, t_plain) for _ in range(runs)]
    return min(timed, key=lambda t: t["total"])


def _crossfit_once(store: str, root: Path, videos: list[str], t_plain: float) -> dict:
    from vspw_ray.config import EnsembleConfig
    from vspw_ray.data import list_frames, split_folds
    from vspw_ray.ensemble.core.candidates import all_candidates, fits_for
    from vspw_ray.ensemble.core.outcome import decide
    from vspw_ray.ensemble.core.rescore import rescore
    from vspw_ray.ensemble.methods import SearchSpace, grid_method
    from vspw_ray.metrics import mean_iou

    folds = dict(zip("AB", split_folds(videos, 0)))
    e = EnsembleConfig(method="grid", grid_step=0.1, selection="crossfit", candidates=3)
    space = SearchSpace(store, str(root), "val", folds, fits_for("crossfit"), GROUPS, MEMBERS,
                        e, CLASSES, 1)
    frames = {v: [f.name for f in list_frames(root, v)] for v in videos}
    serial = lambda fn, jobs: map(fn, jobs)  # noqa: E731
    t = time.perf_counter()
    selections = grid_method(space, serial)
    t_grid = time.perf_counter() - t
    cands = all_candidates([c for sel in selections.values() for c in sel.top], MEMBERS, {},
                           GROUPS)
    t = time.perf_counter()
    rescored = rescore(store, str(root), "val", frames, {c.name: c.plan("prob", CLASSES)
                                                         for c in cands}, MEMBERS, 1, serial,
                       agreement=True)
    out = decide(cands, rescored, folds, space.fits, "crossfit")
    t_rescore = time.perf_counter() - t
    total = t_grid + t_rescore
    print(f"cross-fitted grid: folds A / B {len(folds['A'])} / {len(folds['B'])} videos, grid "
          f"{t_grid:.2f}s, {len(cands)} candidates rescored {t_rescore:.2f}s, total "
          f"{total:.2f}s = {total / t_plain:.2f}x the plain pass; chosen on all of val "
          f"{out.applied.name}, out-of-fold mIoU "
          f"{100 * mean_iou(out.figures['ensemble']['all'][0]):.2f} (best single "
          f"{100 * mean_iou(out.figures['single']['all'][0]):.2f})", flush=True)
    return {"total": total, "grid": t_grid, "rescore": t_rescore, "candidates": len(cands)}


def time_sample(store: str, root: Path, videos: list[str], best, best_miou: float) -> dict:
    from vspw_ray.ensemble.core.sample import sample_miou, sample_store

    t = time.perf_counter()
    sample = sample_store(store, "val", str(root), videos, GROUPS, rate=0.2,
                          box=[(0, 2), (0, 2)])
    t_build = time.perf_counter() - t
    weights = np.random.default_rng(1).uniform(0, 2, size=(200, 2))
    sample_miou(sample, best)
    t = time.perf_counter()
    for w in weights:
        sample_miou(sample, w)
    t_eval = (time.perf_counter() - t) / len(weights)
    gap = 100 * (sample_miou(sample, best) - best_miou)
    print(f"pixel sample: {sample.size} pixels x {sample.scores.shape[2]} candidate columns "
          f"({sample.scores.nbytes / 1e6:.2f} MB, built in {t_build:.1f}s); "
          f"{1e3 * t_eval:.2f} ms per sample_miou; mIoU at the grid best {gap:+.3f} points "
          f"from the full one", flush=True)
    return {"eval": t_eval, "gap": gap, "sample": sample}


def time_tune(store: str, root: Path, videos: list[str], sample, grid_best_miou: float,
              trials: int, tmp: Path) -> dict:
    """Ray Tune + OptunaSearch (the ensemble's own ``run_tuner``) against a bare Optuna loop
    with the same seeded TPE, storage kind and trial count on the same pixel sample; the Tune
    winner re-scored on every pixel of the frames against the grid's best."""
    import optuna
    import ray

    from vspw_ray.ensemble.core.grid import grid_search_store
    from vspw_ray.ensemble.core.sample import sample_miou
    from vspw_ray.ensemble.tune_search import TuneSetup, WeightSpace, run_tuner
    from vspw_ray.metrics import mean_iou
    from vspw_ray.runtime import connect_ray

    names = ("weak", "aux")
    connect_ray(num_cpus=2)
    try:
        setup = TuneSetup(f"sqlite:///{tmp / 'optuna.db'}", "bench_tune", str(tmp / "tune"),
                          "bench_tune", concurrency=2)
        t = time.perf_counter()
        space = WeightSpace(GROUPS, 0.0, 2.0, inner=False)  # group weights, as the grid's
        rows = run_tuner({"A": sample}, space, trials, 0, setup)["A"]
        t_tune = time.perf_counter() - t
    finally:
        ray.shutdown()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="bench_bare",
                                sampler=optuna.samplers.TPESampler(seed=0),
                                storage=f"sqlite:///{tmp / 'optuna.db'}")
    t = time.perf_counter()
    study.optimize(lambda tr: sample_miou(sample, [tr.suggest_float(n, 0.0, 2.0) for n in names]),
                   n_trials=trials)
    t_bare = time.perf_counter() - t
    best = max(rows, key=lambda r: r.val_a)
    weights = np.array([[best.params[n] for n in names]])
    full = mean_iou(grid_search_store(store, GROUPS, "val", videos, str(root), weights,
                                      processes=1)[0])
    gap = 100 * (full - grid_best_miou)
    print(f"Tune: {len(rows)} trials in {t_tune:.1f}s ({len(rows) / t_tune:.1f}/s, Ray start "
          f"excluded, 2 concurrent); bare Optuna loop: {trials} in {t_bare:.1f}s "
          f"({trials / t_bare:.1f}/s); Tune's best {weights[0].round(3).tolist()} scores "
          f"{100 * full:.2f} on every pixel, {gap:+.3f} points from the grid's best", flush=True)
    return {"tune_rate": len(rows) / t_tune, "bare_rate": trials / t_bare, "gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--naive-points", type=int, default=2)
    parser.add_argument("--fidelity-frames", type=int, default=4)
    parser.add_argument("--tune-trials", type=int, default=48)
    parser.add_argument("--memory-child", nargs=2, metavar=("STORE", "ROOT"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root4, store4 = build(Path(tmp), 8)  # timed, and the 4x of the memory test
        root1, store1 = build(Path(tmp), 2)
        print(f"[{time.perf_counter() - start:.0f}s] stores built: {len(MEMBERS)} members, "
              f"{CLASSES} classes, {HEIGHT}x{WIDTH}", flush=True)
        grid = time_grid(store4, root4, args.naive_points)
        crossfit = time_crossfit(store4, root4, grid["videos"], grid["plain"])
        sample = time_sample(store4, root4, grid["videos"], grid["best"], grid["best_miou"])
        tuned = time_tune(store4, root4, grid["videos"], sample["sample"], grid["best_miou"],
                          args.tune_trials, Path(tmp))
        mem = {(x, fixed): peak_memory(store, root, fixed) for x, store, root in
               ((1, store1, root1), (4, store4, root4)) for fixed in (True, False)}
        above = {k: v["peak_mb"] - v["after_imports_mb"] for k, v in mem.items()}
        print(f"[{time.perf_counter() - start:.0f}s] peak RSS of a grid run, 2 / 8 frames per "
              f"video: {above[1, True]:.0f} / {above[4, True]:.0f} MB over the "
              f"{mem[1, True]['after_imports_mb']:.0f} MB after imports (freed arrays returned "
              f"to the system); default allocator: total {mem[1, False]['peak_mb']:.0f} / "
              f"{mem[4, False]['peak_mb']:.0f} MB", flush=True)
    fid = fidelity(args.fidelity_frames)
    diff = 100 * (fid["store"] - fid["dense"])
    diff_full = 100 * (fid["full_res"] - fid["dense"])
    ratio = fid["bytes_per_frame"] / fid["dense_fp16_bytes"]
    print(f"[{time.perf_counter() - start:.0f}s] VSPW size, 124 classes "
          f"({fid['classes_present']} present), 6 members: fused mIoU dense "
          f"{100 * fid['dense']:.2f}, store {100 * fid['store']:.2f} ({diff:+.3f}), the store's "
          f"encoding at full resolution {100 * fid['full_res']:.2f} ({diff_full:+.3f}); "
          f"{fid['bytes_per_frame'] / 1e3:.0f} kB per member-frame vs dense fp16 "
          f"{fid['dense_fp16_bytes'] / 1e6:.1f} MB", flush=True)
    lines = [
        {"metric": "grid_21x21_time_over_plain_read_decode_pass",
         "value": round(grid["grid"] / grid["plain"], 3), "target": 3, "unit": "ratio"},
        {"metric": "grid_crossfit_with_candidates_time_over_plain_read_decode_pass",
         "value": round(crossfit["total"] / grid["plain"], 3), "target": 4,
         "unit": f"ratio (grid on A and B, {crossfit['candidates']} candidates rescored)"},
        {"metric": "candidates_rescore_time_over_plain_read_decode_pass",
         "value": round(crossfit["rescore"] / grid["plain"], 3), "target": None,
         "unit": "ratio"},
        {"metric": "grid_speedup_vs_naive_per_point_reread",
         "value": round(grid["naive_point"] * grid["points"] / grid["grid"], 1), "target": 20,
         "unit": f"x (naive timed on {args.naive_points} points, extrapolated per point)"},
        {"metric": "grid_peak_memory_4x_over_1x_frames_above_imports",
         "value": round(above[4, True] / above[1, True], 3), "target": 1.2, "unit": "ratio"},
        {"metric": "grid_peak_memory_4x_over_1x_frames_total_default_allocator",
         "value": round(mem[4, False]["peak_mb"] / mem[1, False]["peak_mb"], 3), "target": 1.2,
         "unit": "ratio"},
        {"metric": "sample_miou_time", "value": round(1e3 * sample["eval"], 3), "target": None,
         "unit": "ms"},
        {"metric": "sample_vs_full_miou_gap_at_grid_best", "value": round(sample["gap"], 3),
         "target": 0.3, "unit": "points"},
        {"metric": "tune_trials_per_s", "value": round(tuned["tune_rate"], 2), "target": None,
         "unit": "trials/s (Ray Tune + OptunaSearch, 2 concurrent, sample_miou trials)"},
        {"metric": "bare_optuna_trials_per_s", "value": round(tuned["bare_rate"], 2),
         "target": None, "unit": "trials/s (study.optimize, same sampler and storage)"},
        {"metric": "tune_best_vs_grid_best_full_miou_gap", "value": round(tuned["gap"], 3),
         "target": -0.1, "unit": "points (3 groups; target: no more than 0.1 below)"},
        {"metric": "store_vs_dense_fused_miou_diff_vspw_124cls_6members",
         "value": round(diff, 3), "target": 0.1, "unit": "points"},
        {"metric": "full_res_encoding_vs_dense_fused_miou_diff_vspw",
         "value": round(diff_full, 3), "target": None, "unit": "points"},
        {"metric": "store_bytes_per_frame_over_dense_fp16_vspw", "value": round(ratio, 5),
         "target": None, "unit": "ratio"},
    ]
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
