"""Reproduce the seed's ablations at small scale on real data, through the product's own stages.

``experiments/camvid_ablations.yaml`` on ``../shared/data/camvid`` (train -> val): tiny models of
both families on the CPU, x 2 seeds, run by ``vspw-ray pipeline`` (train -> SWA -> TTA inference
-> ensemble), every stage tracked in MLflow. Then, with the same stage functions:

* the single-scale rows (Table 2 and the TTA table's baseline): the training and SWA
  checkpoints' own whole-frame validation, from the per-video confusion matrices each stage
  saves beside its checkpoint (``val_confusions.npz``);
* one ensemble per seed over that seed's members (``vspw-ray ensemble`` with
  ``ensemble.members``), and the seed's Table 3 rows (S, S+W, S+W+A at equal group weights)
  rescored from the score store with the ensemble's own fusion.

Every row gives fold A (where weights and settings are chosen) and fold B (held out) mIoU as
mean +/- sd over seeds, and each claim a paired bootstrap interval over fold-B videos of the
difference (mean over seeds) from per-video confusion matrices; a claim "held" only where the
interval excludes 0. CamVid has no test split: fold B measures selection luck within val, not
the seed's val-to-test shift.

    python benchmarks/reproduce_camvid.py                  # the full run (<= 60 min, 2 cores)
    python benchmarks/reproduce_camvid.py --smoke          # 1 seed, a few iterations, 3 of the
                                                           # rows (SMOKE_ROWS), the 4 shortest
                                                           # train and val videos, val cut to
                                                           # 8 frames a video (CI)
    python benchmarks/reproduce_camvid.py --root /data/VSPW_480p --sizes vspw --address auto \\
        --storage s3://bucket/ablations                   # the same rows on VSPW, on a cluster

Writes ``<storage>/reproduce/results.md`` and ``results.json``; prints the tables, then JSON
lines ``{"metric", "value", "target", "unit"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = ROOT / "experiments" / "camvid_ablations.yaml"
# the smoke's TTA: two scales without flip (the full run: three scales and flip, 6 views a frame)
SMOKE_TTA = ["infer.scales=[0.5,1.0]", "infer.flip=false"]
SMOKE = ["train.iters=4", "train.val_interval=4", "train.warmup_iters=1", "train.log_interval=2",
         "swa.extra_iters=4", "swa.every=2", "swa.bn_batches=1", "ensemble.grid_step=0.5",
         "data.loader_workers=0", "pipeline.max_concurrent=3", *SMOKE_TTA]
SMOKE_VIDEOS = {"train": 4, "val": 4}  # the smoke's view of the data: the shortest videos
SMOKE_VAL_FRAMES = 4  # of each val video (VC8 needs 9: the smoke judges mIoU only)
# the smoke's 3 variants, all in flight at once: both crops and MaskFormer (Tables 1, 2, 3 and
# TTA; the ensemble's strong, weak and auxiliary groups one member each)
SMOKE_ROWS = ("upernet_c180", "upernet_c240", "maskformer_c240")
# (label, variant base name): the member rows of each table, the base name its id in CLAIMS
TABLES = {
    "Table 1: crop size and OHEM (UperNet)": [
        ("crop 135x180", "upernet_c180"), ("crop 180x240 (480:640)", "upernet_c240"),
        ("crop 180x240 + OHEM", "upernet_c240_ohem")],
    "Table 4: logit adjustment (tau 0.03)": [
        ("UperNet", "upernet_c240"), ("UperNet + LA", "upernet_c240_la")],
    "Table 5: self-distillation": [
        ("UperNet", "upernet_c240"), ("UperNet + SD (teacher: same-seed UperNet)",
                                      "upernet_c240_sd")],
}
CLAIMS = {  # table -> (row, baseline row, the seed's claim); rows by their ids
    "Table 1: crop size and OHEM (UperNet)": [
        ("upernet_c240", "upernet_c180", "the larger crop helps"),
        ("upernet_c240_ohem", "upernet_c240", "OHEM helps")],
    "Table 4: logit adjustment (tau 0.03)": [("upernet_c240_la", "upernet_c240", "LA helps on val")],
    "Table 5: self-distillation": [("upernet_c240_sd", "upernet_c240", "SD helps on val")],
    "Table 2: SWA (single scale)": [
        ("upernet_c240:swa", "upernet_c240:train", "SWA helps UperNet"),
        ("maskformer_c240:swa", "maskformer_c240:train", "SWA helps MaskFormer")],
    "TTA: flip x scales vs single scale (SWA models)": [
        ("upernet_c240:tta", "upernet_c240:single", "TTA helps UperNet"),
        ("maskformer_c240:tta", "maskformer_c240:single", "TTA helps MaskFormer")],
    "Table 3: hierarchical ensemble (per seed)": [
        ("default", "single", "the searched ensemble beats the best single model"),
        ("default", "mean", "the searched ensemble beats the plain mean")],
    "Table 3b: both seeds' members in one ensemble": [
        ("default", "single", "with both seeds' members: the ensemble beats the best single")],
}
FAMILIES = [("UperNet", "upernet_c240"), ("MaskFormer", "maskformer_c240")]
# Table 3's methods, each cross-fitted over one seed's members (the smoke: the two cheapest)
METHODS = {"grid": ["ensemble.method=grid"], "tune": ["ensemble.method=tune"],
           "greedy": ["ensemble.method=greedy", "ensemble.bags=1"],
           "bagged": ["ensemble.method=greedy", "ensemble.bags=8"]}
SMOKE_METHODS = {m: METHODS[m] for m in ("grid", "greedy")}
METHOD_LABELS = {"grid": "grid: the seed's groups, weights searched",
                 "tune": "tune: group weights and shares inside groups",
                 "greedy": "greedy selection", "bagged": "bagged greedy (8 bags)"}
DEFAULT_METHOD = "grid"  # the claims' "searched ensemble": the method ensemble.method defaults to


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="1 seed, a few iterations (CI)")
    p.add_argument("--root", help="a VSPW-layout dataset root (default: the experiment's)")
    p.add_argument("--sizes", choices=("camvid", "vspw"), default="camvid",
                   help="vspw: the seed's model, crops 480/640, schedule and TTA "
                        "(experiments/vspw_seed.yaml) with the same rows")
    p.add_argument("--storage", default="runs/reproduce_camvid",
                   help="storage.path (a folder, or s3://... / gs://... on a cluster)")
    p.add_argument("--address", help="Ray cluster address (default: a local instance)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("overrides", nargs="*", help="section.key=value for every variant")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    """The ablation experiment: camvid sizes, or VSPW's; the seeds kept; the overrides."""
    from vspw_ray.config import apply_overrides, config_from_dict, load_config, to_dict

    data = to_dict(load_config(EXPERIMENT))  # every setting: the file states only what differs
    if args.sizes == "vspw":
        data = vspw_sizes(data)
    storage = args.storage.rstrip("/")
    overrides = [f"storage.path={storage}",
                 f"loss.logit_adjust.prior={storage}/stats/class_prior.json"]
    root = args.root or data["data"]["root"]  # as the experiment writes it: from the cwd
    if args.smoke:
        root = smoke_view(root, smoke_folder(storage))
    if root != data["data"]["root"]:
        overrides.append(f"data.root={root}")
    overrides += (SMOKE if args.smoke else []) + list(args.overrides)
    data = apply_overrides(data, overrides)
    seeds = 1 if args.smoke else args.seeds
    data["variants"] = [v for v in data["variants"] if v["seed"] < seeds and (
        not args.smoke or base_name(v["name"]) in SMOKE_ROWS)]
    return config_from_dict(data), seeds


def base_name(variant: str) -> str:
    """``upernet_c240_s1`` -> ``upernet_c240``: the row a variant belongs to."""
    return variant.rsplit("_s", 1)[0]


def smoke_folder(storage: str) -> str:
    """Where the smoke's data view lives: beside local runs, else in the temporary folder."""
    import hashlib
    import tempfile

    from vspw_ray.storage import is_uri

    if not is_uri(storage):
        return f"{storage}/smoke_data"
    return str(Path(tempfile.gettempdir()) / "vspw_ray_smoke" / hashlib.sha256(
        storage.encode()).hexdigest()[:12])


def smoke_view(root: str, dest: str) -> str:
    """A view of ``root`` for the smoke run: its shortest train and val videos
    (``SMOKE_VIDEOS``), val videos cut to their first ``SMOKE_VAL_FRAMES`` frames (every stage
    scores val at full resolution: most of the smoke's compute), as split files and links to
    the original frames, masks and class table (nothing is copied). Returns the view's root."""
    from vspw_ray.data import list_frames, read_split

    src, view = Path(root).resolve(), Path(dest)
    if (view / "data").is_symlink():  # an older smoke's view linked the whole folder
        (view / "data").unlink()
    (view / "data").mkdir(parents=True, exist_ok=True)
    if not (view / "label_num_dic_final.json").exists():
        (view / "label_num_dic_final.json").symlink_to(src / "label_num_dic_final.json")
    for split, n in SMOKE_VIDEOS.items():
        videos = read_split(src, split)
        shortest = sorted(videos, key=lambda v: (len(list_frames(src, v)), v))[:n]
        for video in shortest:
            _link_video(src, view, video, SMOKE_VAL_FRAMES if split == "val" else None)
        (view / f"{split}.txt").write_text("".join(f"{v}\n" for v in videos if v in shortest))
    return str(view)


def _link_video(src: Path, view: Path, video: str, frames: int | None) -> None:
    """``view/data/video`` -> the original video folder, or, with ``frames``, folders of links
    to its first frames and their masks."""
    from vspw_ray.data import list_frames

    folder = view / "data" / video
    if folder.exists() or folder.is_symlink():
        return
    if frames is None:
        folder.symlink_to(src / "data" / video)
        return
    for sub in ("origin", "mask"):
        (folder / sub).mkdir(parents=True)
    for f in list_frames(src, video)[:frames]:
        (folder / "origin" / f.image.name).symlink_to(f.image)
        (folder / "mask" / f.mask.name).symlink_to(f.mask)


def vspw_sizes(data: dict) -> dict:
    """The same rows at the seed's sizes: vspw_seed.yaml's sections (Swin-L, schedule, SWA, TTA,
    GPUs), crops 480 / 640, OHEM's 200k, MaskFormer at paper scale, val only."""
    from vspw_ray.config import load_config, to_dict

    seed = to_dict(load_config(ROOT / "experiments" / "vspw_seed.yaml"))
    out = {**seed, "name": "vspw_ablations", "variants": []}
    out["loss"] = {**seed["loss"], "ohem": {**seed["loss"]["ohem"], "enabled": False}}
    out["pipeline"] = {**seed["pipeline"], "splits": ["val"]}
    crops = {(135, 180): [480, 480], (180, 240): [640, 640]}
    for v in data["variants"]:
        ov = {k: x for k, x in v["overrides"].items()
              if not k.startswith("model.") or k == "model.family"}
        ov["data.crop_size"] = crops[tuple(ov["data.crop_size"])]
        if "loss.ohem.min_kept" in ov:
            ov["loss.ohem.min_kept"] = seed["loss"]["ohem"]["min_kept"]
        out["variants"].append({**v, "overrides": ov})
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    from vspw_ray.pipeline.run import run_pipeline

    cfg, seeds = build_config(args)
    start = time.perf_counter()
    result = run_pipeline(cfg, address=args.address)
    t_pipeline = time.perf_counter() - start
    ctx = Context(cfg, seeds, args.address, recorded_outputs(cfg, result), args.bootstrap,
                  args.smoke)
    tables = {title: member_table(ctx, rows) for title, rows in TABLES.items()}
    tables = {title: rows for title, rows in tables.items() if len(rows) > 1}
    tables["Table 2: SWA (single scale)"] = swa_table(ctx)
    tables["TTA: flip x scales vs single scale (SWA models)"] = tta_table(ctx)
    tables["Table 3: hierarchical ensemble (per seed)"] = ensemble_table(ctx)
    if seeds > 1 and not args.smoke:
        tables["Table 3b: both seeds' members in one ensemble"] = seeds_table(ctx)
    wall = time.perf_counter() - start
    claims = judge(tables, ctx)
    records = choice_records(ctx)
    text = render(tables, claims, cfg, seeds, wall, t_pipeline, args.smoke,
                  guarantee_text(records))
    write_results(cfg.storage.path, text, tables, claims, wall, records)
    print(text, flush=True)
    held = sum(c["verdict"] == "held" for c in claims)
    for line in ({"metric": "reproduce_wall_time", "value": round(wall, 1),
                  "target": None if args.smoke else 3600, "unit": "s"},
                 {"metric": "seed_claims_held", "value": held, "target": None,
                  "unit": f"of {len(claims)} (bootstrap interval of the difference excludes 0)"}):
        print(json.dumps(line))


def recorded_outputs(cfg, result) -> dict:
    """Every step's outputs: this run's, else its completion record's (a run that found
    "nothing to do" returns none of its own)."""
    from vspw_ray.pipeline.run import plan_pipeline
    from vspw_ray.stages.records import read_record

    layout, steps = plan_pipeline(cfg)
    return {s.id: result.records[s.id].outputs() if s.id in result.records else
            (read_record(layout, cfg.name, s.id) or {}).get("outputs", {}) for s in steps}


class Context:
    """The finished pipeline's outputs and what the tables share."""

    def __init__(self, cfg, seeds: int, address: str | None, outputs: dict, samples: int,
                 smoke: bool = False):
        from vspw_ray.data import read_split, split_folds
        from vspw_ray.stages import variants_of

        self.cfg, self.seeds, self.address, self.smoke = cfg, seeds, address, smoke
        self.ensembles: dict[int, dict[str, dict]] = {}  # seed -> method -> report
        self.outputs, self.samples = outputs, samples
        self.variants = {v.name: v.cfg for v in variants_of(cfg)}
        self.bases = {base_name(name) for name in self.variants}
        self.folds = dict(zip("AB", split_folds(read_split(cfg.data.root, cfg.data.val_split),
                                                 cfg.data.fold_seed)))
        self.store = f"{cfg.storage.path.rstrip('/')}/scores"
        self._videos: dict[str, dict] = {}
        self._validated: dict[tuple[str, str], dict] = {}  # (variant, stage) -> single_scale's

    def names(self, base: str) -> list[str]:
        return [f"{base}_s{s}" for s in range(self.seeds)]

    def member(self, name: str) -> dict:
        """The pipeline's TTA'd member of a variant: its store key, fold figures and fold-B
        per-video confusion matrices."""
        out = self.outputs[f"infer:{name}/{self.cfg.data.val_split}"]
        return {"key": out["member_key"], "A": out["final/val_A/miou"],
                "B": out["final/val_B/miou"], "videos": self.videos(out["member_key"])}

    def videos(self, key: str) -> dict:
        """Per-video confusion matrices of a store member on fold B (cached)."""
        from vspw_ray.evaluate import video_confusions

        if key not in self._videos:
            self._videos[key] = video_confusions(self.store, key, self.cfg.data.root,
                                                 self.cfg.data.val_split, self.folds["B"])
        return self._videos[key]


def row(label: str, per_seed: list[dict], row_id: str) -> dict:
    """A table row: per-seed ``{"A", "B", "videos"}`` -> mean and sd over seeds; ``row_id``
    names it for the claims."""
    a, b = (np.array([s[f] for s in per_seed]) for f in "AB")
    out = {"id": row_id, "label": label, "A": float(a.mean()), "A_sd": _sd(a),
           "B": float(b.mean()), "B_sd": _sd(b), "seeds": len(per_seed),
           "videos": [s["videos"] for s in per_seed]}
    if "all" in per_seed[0]:  # Table 3: out of fold over all of val
        x = np.array([s["all"] for s in per_seed])
        out.update({"all": float(x.mean()), "all_sd": _sd(x)})
    return out


def _sd(x: np.ndarray) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else float("nan")


def member_table(ctx: Context, rows) -> list[dict]:
    """The rows whose variants this run has (the smoke has a few)."""
    out = []
    for label, base in rows:
        if base not in ctx.bases:
            continue
        out.append(row(label, [ctx.member(n) for n in ctx.names(base)], base))
    return out


def single_scale(ctx: Context, name: str, stage: str) -> dict:
    """A training or SWA checkpoint at a single scale without flip: the stage's own whole-frame
    validation (the model's prediction at each frame's size, scored at full resolution, as the
    store's members are), read from the per-video confusion matrices saved beside the
    checkpoint; no second inference. Read once per checkpoint (Table 2 and the TTA table share
    the SWA models' rows)."""
    if (name, stage) not in ctx._validated:
        ctx._validated[name, stage] = _validated(ctx, name, stage)
    return ctx._validated[name, stage]


def _validated(ctx: Context, name: str, stage: str) -> dict:
    from vspw_ray.checkpoints import read_val_confusions
    from vspw_ray.metrics import mean_iou

    checkpoint = ctx.outputs[f"{stage}:{name}"]["checkpoint"]
    try:
        videos = read_val_confusions(checkpoint)
    except FileNotFoundError as err:
        raise SystemExit(f"{err}\n(the {stage} checkpoint of {name} predates per-video "
                         f"matrices: run the script with a new --storage)") from None
    missing = sorted(set(ctx.folds["A"] + ctx.folds["B"]) - videos.keys())
    if missing:
        raise SystemExit(f"the {stage} checkpoint of {name} ({checkpoint}) was validated without "
                         f"val videos {missing[:5]}: run the script with a new --storage")
    return {f: mean_iou(sum(videos[v] for v in ctx.folds[f])) for f in "AB"} | {
        "videos": {v: videos[v] for v in ctx.folds["B"]}}


def swa_table(ctx: Context) -> list[dict]:
    out = []
    for family, base in FAMILIES:
        for stage, label in (("train", family), ("swa", f"{family} + SWA")):
            out.append(row(label, [single_scale(ctx, n, stage) for n in ctx.names(base)],
                           f"{base}:{stage}"))
    return out


def tta_table(ctx: Context) -> list[dict]:
    out = []
    for family, base in FAMILIES:
        single = [single_scale(ctx, n, "swa") for n in ctx.names(base)]
        tta = [ctx.member(n) for n in ctx.names(base)]
        out += [row(f"{family}, single scale", single, f"{base}:single"),
                row(f"{family}, TTA", tta, f"{base}:tta")]
    return out


def ensemble_table(ctx: Context) -> list[dict]:
    """Table 3, one ensemble per seed over that seed's members: the best single member, the
    plain mean, the seed's S / S+W / S+W+A at equal weights, then one row per method
    (cross-fitted: fold A the fusion chosen on B, fold B the one chosen on A, "all" the
    out-of-fold figure over all of val); each row carries per-video matrices over all val."""
    methods = SMOKE_METHODS if ctx.smoke else METHODS
    per_seed = [seed_ensemble(ctx, s, methods) for s in range(ctx.seeds)]
    ids = [r for r, _, _ in per_seed[0]]
    labels = {r: label for r, label, _ in per_seed[0]}
    return [row(labels[i], [{r: x for r, _, x in rows}[i] for rows in per_seed], i) for i in ids]


def seed_ensemble(ctx: Context, seed: int, methods: dict) -> list[tuple[str, str, dict]]:
    """``(row id, label, figures)`` of one seed's ensembles over that seed's members."""
    names = [n for n in ctx.variants if n.endswith(f"_s{seed}")]
    reports = {m: _ensemble(ctx, names, overrides) for m, overrides in methods.items()}
    first = reports[next(iter(methods))]
    result = [("single", f"best single on val ({base_name(first['best_single_name'])})",
               _figures(first, "single")),
              ("mean", f"plain mean of {len(names)}", _figures(first, "mean"))]
    result += group_rows(ctx, first["groups_auto"])
    result += [(m, METHOD_LABELS[m], _figures(r, "ensemble")) for m, r in reports.items()]
    ctx.ensembles[seed] = reports
    return result


def _ensemble(ctx: Context, names: list[str], overrides: list[str]) -> dict:
    """One cross-fitted ensemble over ``names``: its report, per-video matrices and groups."""
    from vspw_ray.config import apply_overrides, config_from_dict, to_dict
    from vspw_ray.ensemble.stage import run_ensemble

    data = apply_overrides(to_dict(ctx.cfg), ["ensemble.selection=crossfit", *overrides])
    data["ensemble"]["members"] = list(names)
    out = run_ensemble(config_from_dict(data), address=ctx.address)
    report = dict(out.report)
    report["videos"] = load_npz(f"{out.path}/video_confusions.npz")
    report["groups_auto"] = auto_groups_of(report, ctx.cfg.ensemble)
    return report


def seeds_table(ctx: Context) -> list[dict]:
    """Seeds as members: the default method over every seed's members at once, against the
    best single member and the plain mean of those members (one ensemble, no sd)."""
    report = _ensemble(ctx, list(ctx.variants), METHODS[DEFAULT_METHOD])
    ctx.ensembles["all"] = {DEFAULT_METHOD: report}
    n = len(ctx.variants)
    rows = [("single", f"best single of {n} ({report['best_single_name']})", "single"),
            ("mean", f"plain mean of {n}", "mean"),
            (DEFAULT_METHOD, f"{METHOD_LABELS[DEFAULT_METHOD]}, {n} members", "ensemble")]
    return [row(label, [_figures(report, variant)], row_id) for row_id, label, variant in rows]


def auto_groups_of(report: dict, ecfg) -> dict:
    """The seed's strong / weak / aux groups of a report's members (member keys)."""
    from vspw_ray.ensemble.core.fusion import MemberInfo, auto_groups

    infos = [MemberInfo(m["key"], m["family"], m["miou_a"]) for m in report["members"]]
    return auto_groups(infos, ecfg.strong, ecfg.auxiliary)


def _figures(report: dict, variant: str) -> dict:
    fig, oof = report["figures"][variant], report["out_of_fold"][variant]
    return {"A": fig["A"]["miou"], "B": fig["B"]["miou"], "all": oof["miou"],
            "videos": report["videos"][variant]}


def group_rows(ctx: Context, groups: dict) -> list[tuple[str, str, dict]]:
    """S, S+W, S+W+A at equal group weights, rescored with the ensemble's own fusion."""
    from vspw_ray.data import list_frames, read_split
    from vspw_ray.ensemble.core.rescore import FusionPlan, rescore
    from vspw_ray.metrics import mean_iou

    order = list(groups)
    frames = {v: [f.name for f in list_frames(ctx.cfg.data.root, v)]
              for v in read_split(ctx.cfg.data.root, ctx.cfg.data.val_split)}
    num_classes = _num_classes(ctx)
    out = []
    for k in range(1, len(order) + 1):
        plan = FusionPlan({g: groups[g] for g in order[:k]}, (1.0,) * (k - 1),
                          ctx.cfg.ensemble.space, num_classes)
        members = [m for g in order[:k] for m in groups[g]]
        done = rescore(ctx.store, ctx.cfg.data.root, ctx.cfg.data.val_split, frames,
                       {"fused": plan}, members, 1, lambda fn, jobs: map(fn, jobs))
        label = " + ".join(g[0].upper() for g in order[:k]) + \
            (" (equal weights)" if k > 1 else f" (mean of {len(groups[order[0]])})")
        row_id = "".join(g[0].upper() for g in order[:k])
        videos = ctx.folds["A"] + ctx.folds["B"]
        out.append((row_id, label, {f: mean_iou(done.fold("fused", ctx.folds[f])[0])
                                    for f in "AB"} |
                    {"all": mean_iou(done.fold("fused", videos)[0]),
                     "videos": done.by_video("fused", videos)}))
    return out


def _num_classes(ctx: Context) -> int:
    from vspw_ray.data import load_class_table

    return load_class_table(ctx.cfg.data.root).num_classes


def load_npz(path: str) -> dict[str, dict[str, np.ndarray]]:
    """``video_confusions.npz`` (local or remote) -> ``{variant: {video: matrix}}``."""
    import io

    from vspw_ray.storage import filesystem

    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f, np.load(io.BytesIO(f.read())) as z:
        out: dict[str, dict[str, np.ndarray]] = {}
        for name in z.files:
            variant, video = name.split("/", 1)
            out.setdefault(variant, {})[video] = z[name]
    return out


def judge(tables: dict, ctx: Context) -> list[dict]:
    """Each claim whose rows this run has: the fold-B difference (mean over seeds) and its
    bootstrap interval."""
    from vspw_ray.metrics import bootstrap_miou_difference

    out = []
    for table, claims in CLAIMS.items():
        rows = {r["id"]: r for r in tables.get(table, [])}
        rows["default"] = rows.get(DEFAULT_METHOD)
        out += [_claim(table, rows[i], rows[j], claim, ctx, bootstrap_miou_difference)
                for i, j, claim in claims if rows.get(i) and rows.get(j)]
    return out


def _claim(table: str, x: dict, y: dict, claim: str, ctx: Context, bootstrap) -> dict:
    """Fold B's difference, or, for Table 3's cross-fitted rows, the out-of-fold difference
    over all val videos (``diff_B_*`` then holds that)."""
    oof = "all" in x and "all" in y
    videos = ctx.folds["A"] + ctx.folds["B"] if oof else ctx.folds["B"]
    iv = bootstrap(x["videos"], y["videos"], videos, samples=ctx.samples)
    verdict = ("held" if iv.low > 0 else "reversed" if iv.high < 0 else "undecided (noise)")
    return {"table": table, "claim": claim, "row": x["label"], "baseline": y["label"],
            "diff_A": x["A"] - y["A"], **{f"diff_B_{k}": v for k, v in asdict(iv).items()},
            "over": "all val, out of fold" if oof else "fold B", "verdict": verdict}


def _pm(mean: float, sd: float) -> str:
    return f"{100 * mean:.2f}" + ("" if np.isnan(sd) else f" ± {100 * sd:.2f}")


def ensemble_lines(title: str, rows: list[dict]) -> list[str]:
    """Table 3: folds A and B (each out of fold for the searched rows) and all of val."""
    lines = [f"## {title}", "", "fold A: chosen on B; fold B: chosen on A; all val: the two "
             "summed (out of fold); fixed fusions (single, mean, S...) involve no weights", "",
             "| row | fold A mIoU | fold B mIoU | all val, out of fold |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {_pm(r['A'], r['A_sd'])} | {_pm(r['B'], r['B_sd'])} | "
              f"{_pm(r['all'], r['all_sd'])} |" for r in rows]
    return lines + [""]


def choice_records(ctx: Context) -> list[dict]:
    """Per seed, method and fit: the choice and the best single member on the folds that chose
    it (exact figures); and per seed how often members agree."""
    out = []
    for seed, reports in ctx.ensembles.items():
        for method, report in reports.items():
            for fit, ch in report["fits"].items():
                best = max(c["miou"][fit] for c in report["candidates"] if c["kind"] == "single")
                out.append({"seed": seed, "method": method, "fit": fit, "chosen": ch["chosen"],
                            "members": ch["candidate"]["members"], "score": ch["score"],
                            "best_single": best})
        m = np.array(next(iter(reports.values()))["agreement"]["matrix"])
        pairs = m[np.triu_indices(len(m), 1)]
        out.append({"seed": seed, "agreement_mean": float(pairs.mean()),
                    "agreement_min": float(pairs.min()), "agreement_max": float(pairs.max())})
    return out


def guarantee_text(records: list[dict]) -> list[str]:
    choices = [r for r in records if "fit" in r]
    held = sum(r["score"] >= r["best_single"] for r in choices)
    lines = [f"## Choices on the folds that chose them: {held} of {len(choices)} at least the "
             f"best single member", ""]
    for r in records:
        if "fit" in r:
            lines.append(f"- seed {r['seed']}, {r['method']}, chosen on {r['fit']}: "
                         f"{r['chosen']} ({r['members']} members) {100 * r['score']:.2f} vs "
                         f"best single {100 * r['best_single']:.2f}")
        else:
            lines.append(f"- seed {r['seed']}: members agree on {100 * r['agreement_mean']:.1f} "
                         f"% of val pixels (pairs {100 * r['agreement_min']:.1f}-"
                         f"{100 * r['agreement_max']:.1f} %)")
    return lines


def render(tables: dict, claims: list[dict], cfg, seeds: int, wall: float, t_pipe: float,
           smoke: bool, guarantee_lines: list[str] = ()) -> str:
    lines = [f"# {cfg.name}: {seeds} seed(s), data {cfg.data.root}" + (" (smoke)" if smoke else ""),
             f"wall time {wall / 60:.1f} min (pipeline {t_pipe / 60:.1f} min); mIoU in points, "
             f"mean ± sd over seeds; fold A selects, fold B is held out", ""]
    for title, rows in tables.items():
        if rows and "all" in rows[0]:
            lines += ensemble_lines(title, rows)
            continue
        lines += [f"## {title}", "", "| row | fold A mIoU | fold B mIoU |", "|---|---|---|"]
        lines += [f"| {r['label']} | {_pm(r['A'], r['A_sd'])} | {_pm(r['B'], r['B_sd'])} |"
                  for r in rows]
        lines.append("")
    lines += ["## Claims (paired bootstrap over videos, 95 %)", "",
              "| claim | difference A | difference | interval | over | verdict |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {c['claim']} | {100 * c['diff_A']:+.2f} | {100 * c['diff_B_value']:+.2f} | "
              f"[{100 * c['diff_B_low']:+.2f}, {100 * c['diff_B_high']:+.2f}] | "
              f"{c.get('over', 'fold B')} | {c['verdict']} |" for c in claims]
    return "\n".join(lines + [""] + guarantee_lines)


def write_results(storage: str, text: str, tables: dict, claims: list[dict],
                  wall: float, choices: list[dict]) -> None:
    from vspw_ray.storage import filesystem, write_atomic

    plain = {t: [{k: v for k, v in r.items() if k != "videos"} for r in rows]
             for t, rows in tables.items()}
    fs, root = filesystem(f"{storage.rstrip('/')}/reproduce")
    fs.create_dir(root, recursive=True)
    write_atomic(fs, f"{root}/results.md", (text + "\n").encode())
    write_atomic(fs, f"{root}/results.json", json.dumps(
        {"tables": plain, "claims": claims, "choices": choices, "wall_s": wall},
        indent=1).encode())


if __name__ == "__main__":
    main()
