"""`vspw-ray infer`: TTA inference of one checkpoint over a split as a Ray Data job.

Frames are listed on the driver, decoded in CPU tasks (``map_batches`` over a function), and run
through a pool of model actors (``map_batches`` with a callable class; one GPU each on a
cluster, and on a CPU machine the CPUs left after one for the reads) that apply flip x scale
TTA and encode the averaged class distributions (:mod:`vspw_ray.infer.encoding`). The stream
is ordered, so the driver sees each video's frames together: it writes the video's prediction
PNGs and its Parquet file (:mod:`vspw_ray.infer.store`) as soon as the video is complete, and
only a few videos are ever in flight. Re-running the command skips every video already stored.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from vspw_ray.config import ExperimentConfig, config_from_dict, to_dict
from vspw_ray.data.layout import DataError, Frame

__all__ = ["InferResult", "run_inference", "load_inference_model", "decode_frames",
           "TTAPredictor", "num_actors"]

log = logging.getLogger("vspw_ray.infer")


def load_inference_model(checkpoint: str, num_classes: int, device: str = "cpu"):
    """The model of a training/SWA checkpoint, built from the config stored in it, in eval
    mode; returns ``(model, checkpoint config)``."""
    import torch

    from vspw_ray.models import build_model
    from vspw_ray.train.checkpoints import read_state

    state = read_state(checkpoint)
    if "config" not in state or "model" not in state:
        raise ValueError(f"{checkpoint} is not a vspw_ray checkpoint (no config/model inside)")
    cfg = config_from_dict({**state["config"], "model": {**state["config"]["model"],
                                                          "pretrained": None,
                                                          "init_checkpoint": None}})
    # teacher weights are not needed to predict; the prior buffer comes from the checkpoint
    cfg = replace(cfg, loss=replace(cfg.loss, distill=replace(cfg.loss.distill, enabled=False,
                                                              teacher=None)))
    prior = np.full(num_classes, 1.0 / num_classes) if cfg.loss.logit_adjust.enabled else None
    model = build_model(cfg, num_classes, prior)
    sd = state["model"]
    if any(k.startswith("student.") for k in sd):  # a self-distillation run: keep the student
        sd = {k.removeprefix("student."): v for k, v in sd.items() if k.startswith("student.")}
    model.load_state_dict(sd)
    return model.to(torch.device(device)).eval(), cfg


def decode_frames(batch: dict[str, np.ndarray], *, on_bad_frame: str) -> dict[str, np.ndarray]:
    """Ray Data CPU task: JPEG -> raw RGB bytes (plain binary column, no tensor extension)."""
    from vspw_ray.data.layout import read_image

    images, heights, widths, errors = [], [], [], []
    for video, name, path in zip(batch["video"], batch["frame"], batch["image_path"]):
        try:
            img = read_image(Frame(str(video), str(name), Path(str(path)), None))
            images.append(img.tobytes())
            heights.append(img.shape[0])
            widths.append(img.shape[1])
            errors.append("")
        except DataError as err:
            if on_bad_frame == "fail":
                raise DataError(f"{err}; fix or remove the frame, or set "
                                f"infer.on_bad_frame=skip to skip it") from None
            images.append(b"")
            heights.append(0)
            widths.append(0)
            errors.append(str(err))
    return {**batch, "image": np.array(images, dtype=object),
            "height": np.array(heights, np.int32), "width": np.array(widths, np.int32),
            "error": np.array(errors, dtype=object)}


class TTAPredictor:
    """Ray Data actor: TTA class distributions -> prediction PNG bytes and encoded scores."""

    def __init__(self, *, checkpoint: str, num_classes: int, infer: dict, mean, std,
                 torch_threads: int = 1):
        import torch

        from vspw_ray.config import InferConfig
        from vspw_ray.train.loop import autocast_context

        torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, _ = load_inference_model(checkpoint, num_classes, str(self.device))
        self.infer = InferConfig(**{**infer, "scales": tuple(infer["scales"])})
        self.enc = score_encoding(self.infer)
        self.mean, self.std = mean, std
        self.autocast, _ = autocast_context(self.device, "auto")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        from vspw_ray.data.transforms import normalize
        from vspw_ray.infer.encoding import encode
        from vspw_ray.infer.tta import tta_probs

        pngs, classes, codes, sh, sw = [], [], [], [], []
        for raw, h, w, err in zip(batch["image"], batch["height"], batch["width"],
                                  batch["error"]):
            if err:
                pngs.append(b"")
                classes.append(b"")
                codes.append(b"")
                sh.append(0)
                sw.append(0)
                continue
            img = np.frombuffer(raw, np.uint8).reshape(int(h), int(w), 3)
            x = normalize(img, self.mean, self.std).unsqueeze(0).to(self.device)
            probs = tta_probs(self.model, x, self.infer.scales, self.infer.flip, self.autocast)
            pred = probs.argmax(0).to(torch.uint8).cpu().numpy()
            buf = io.BytesIO()
            Image.fromarray(pred, mode="L").save(buf, format="PNG")
            pngs.append(buf.getvalue())
            enc = encode(probs, self.enc)
            classes.append(enc.classes.tobytes())
            codes.append(enc.codes.tobytes())
            sh.append(enc.classes.shape[1])
            sw.append(enc.classes.shape[2])
        out = {k: batch[k] for k in ("video", "frame", "index", "height", "width", "error")}
        return {**out, "png": np.array(pngs, dtype=object),
                "classes": np.array(classes, dtype=object), "codes": np.array(codes, dtype=object),
                "score_height": np.array(sh, np.int32), "score_width": np.array(sw, np.int32)}


def num_actors(cfg: ExperimentConfig, cluster: dict[str, float], threads: int,
               local_cores: int | None = None) -> tuple[int, dict]:
    """Actor count and per-actor resources: one GPU each where GPUs exist; on CPUs, the CPUs
    left after one for the decode tasks (an actor pool that takes every CPU starves the reads
    and hangs). A local instance counts this machine's cores, not its raised logical CPUs."""
    gpus = int(cluster.get("GPU", 0))
    cpus = cluster.get("CPU", 1)
    if local_cores:
        cpus = min(cpus, local_cores)
    if cfg.infer.actors:
        n = cfg.infer.actors
    elif gpus:
        n = gpus
    else:
        n = max(1, int(cpus - 1) // threads)
    return n, ({"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": threads})


@dataclass(frozen=True)
class InferResult:
    variant_id: str
    split: str
    store: str
    predictions: str
    frames: int  # written by this run
    skipped: list[str]
    frames_per_s: float  # end to end, Ray start and actor set-up included
    frames_per_s_steady: float  # from the first frame out to the last
    store_bytes: int
    metrics: dict | None  # val metrics from the stored scores (when the split has masks)
    run_id: str | None


def _write_png(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class _Throughput:
    written: int = 0  # frames this run wrote (stored or skipped)
    first_count: int = 0  # frames in the first batch out
    elapsed: float = 0.0  # seconds from the start, Ray start and actor set-up included
    steady: float = 0.0  # seconds from the first batch out to the last

    @property
    def fps(self) -> float:
        return self.written / self.elapsed if self.written else 0.0

    @property
    def fps_steady(self) -> float:
        later = self.written - self.first_count
        return later / self.steady if self.steady > 0 and later > 0 else self.fps


def run_inference(cfg: ExperimentConfig, checkpoint: str, split: str, *,
                  store: str | None = None, predictions: str | None = None,
                  address: str | None = None, track: bool = True,
                  torch_threads: int = 1, progress=None) -> InferResult:
    """Infer ``checkpoint`` over ``split`` into the score store and prediction PNGs; videos
    already stored are skipped. Metrics from the stored scores when the split has masks."""
    from vspw_ray.data import load_class_table, read_split, split_frames
    from vspw_ray.infer.store import ScoreStore
    from vspw_ray.storage import check_cluster_settings, resolve_storage
    from vspw_ray.train.checkpoints import checkpoint_file, read_summary
    from vspw_ray.train.driver import connect_ray, prepare_config

    address = address or os.environ.get("RAY_ADDRESS")
    check_cluster_settings(cfg, address, track=track)
    cfg = prepare_config(config_from_dict({**to_dict(cfg), "variants": []}))
    storage = resolve_storage(cfg.storage.path)
    checkpoint = checkpoint_file(checkpoint if "://" in checkpoint
                                 else str(Path(checkpoint).expanduser().resolve()))
    header = read_summary(checkpoint)
    vid = header.get("variant_id")
    if not vid:
        raise ValueError(f"{checkpoint} records no variant_id; infer needs a vspw_ray checkpoint")
    root = cfg.data.root
    table = load_class_table(root)
    videos = read_split(root, split)
    frames = split_frames(root, split)
    by_video: dict[str, list[Frame]] = defaultdict(list)
    for f in frames:
        by_video[f.video].append(f)
    store_uri = store or f"{storage.rstrip('/')}/scores"
    scores = ScoreStore(store_uri)
    pred_dir = Path(predictions or f"{storage}/predictions/{vid}/{split}")
    try:
        previous = scores.manifest(vid)
    except ValueError:
        previous = {}
    skipped_before = previous.get("splits", {}).get(split, {}).get("skipped", {})
    expected = {v: len(by_video[v]) - len(skipped_before.get(v, [])) for v in videos}
    done = {v for v in scores.done_videos(vid, split, expected)
            if all((pred_dir / v / f"{f.name}.png").is_file() for f in by_video[v]
                   if f.name not in skipped_before.get(v, []))}
    todo = [v for v in videos if v not in done]
    manifest = _manifest(cfg, vid, header.get("parent_variant_id"), checkpoint, table, previous)
    print(f"infer {vid} on {split}: {len(videos)} videos, {len(done)} already stored, "
          f"{len(todo)} to run", flush=True)

    skipped: dict[str, list[str]] = {v: list(n) for v, n in skipped_before.items()}
    rate = _Throughput()
    start = time.perf_counter()
    if todo:
        connect_ray(address)
        batches = _pipeline(cfg, [f for v in todo for f in by_video[v]], checkpoint,
                            table.num_classes, address, torch_threads)
        rate = _write_stream(batches, scores, vid, split, pred_dir,
                             {v: len(by_video[v]) for v in todo}, skipped, progress, start)
    manifest["splits"][split] = {
        "videos": len(videos), "frames": sum(len(by_video[v]) for v in videos),
        "skipped": {v: n for v, n in skipped.items() if n}}
    scores.write_manifest(vid, manifest)
    n_skipped = sum(len(v) for v in skipped.values())
    metrics = None
    if _has_masks(frames) and not n_skipped:
        metrics = _store_metrics(scores, vid, root, split)
    elif n_skipped:
        print(f"no {split} metrics: {n_skipped} frames were skipped", flush=True)
    manifest["splits"][split]["metrics"] = metrics
    store_bytes = scores.size_bytes(vid, split)
    run_id = None
    if track:
        run_id = _log_run(cfg, storage, vid, split, checkpoint, store_uri, rate, store_bytes,
                          manifest["splits"][split]["frames"], metrics)
        manifest["mlflow_run_id"] = run_id
    scores.write_manifest(vid, manifest)
    return InferResult(vid, split, store_uri, str(pred_dir), rate.written,
                       [f"{v}/{n}" for v, ns in skipped.items() for n in ns], rate.fps,
                       rate.fps_steady, store_bytes, metrics, run_id)


def score_encoding(infer):
    """The store encoding (:class:`~vspw_ray.infer.encoding.ScoreEncoding`) that an
    ``InferConfig`` asks for."""
    from vspw_ray.infer.encoding import ScoreEncoding

    return ScoreEncoding(infer.score_scale, infer.top_k, infer.score_step)


def _manifest(cfg: ExperimentConfig, vid: str, parent: str | None, checkpoint: str, table,
              previous: dict) -> dict[str, Any]:
    """The member's manifest: what produced its scores and how to read them; the other
    splits' entries and the MLflow run are carried over from ``previous``."""
    return {
        "variant_id": vid, "parent_variant_id": parent, "checkpoint": checkpoint,
        "class_names": table.names, "num_classes": table.num_classes,
        "tta": {"scales": list(cfg.infer.scales), "flip": cfg.infer.flip},
        "encoding": {"name": "topk-logq-u8", "params": score_encoding(cfg.infer).to_dict(),
                     "doc": "classes/codes: uint8 [top_k, score_height, score_width]; "
                            "p = exp(-code * step); the remaining mass is spread evenly over "
                            "the other classes; resize bilinearly to height x width"},
        "schema": "video, frame, height, width, score_height, score_width, classes, codes",
        "splits": {**previous.get("splits", {})},
        "mlflow_run_id": previous.get("mlflow_run_id"),
    }


def _pipeline(cfg: ExperimentConfig, frames: list[Frame], checkpoint: str, num_classes: int,
              address: str | None, torch_threads: int):
    """The Ray Data job over ``frames``, in order: decode tasks, then the TTA actor pool; an
    iterator over its output batches."""
    import ray
    import ray.data

    n, resources = num_actors(cfg, ray.cluster_resources(), torch_threads,
                              None if address else os.cpu_count())
    print(f"{n} model actor(s) ({resources}), TTA scales {list(cfg.infer.scales)} "
          f"flip={cfg.infer.flip}", flush=True)
    items = [{"video": f.video, "frame": f.name, "image_path": str(f.image), "index": i}
             for i, f in enumerate(frames)]
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # one progress line of ours instead
    # small blocks (a frame or a few each): results stream back frame by frame, not in chunks
    # that hold the first output back
    ds = (ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 1000 * n)))
          .map_batches(decode_frames, batch_size=cfg.infer.batch_size, batch_format="numpy",
                       fn_kwargs={"on_bad_frame": cfg.infer.on_bad_frame}, num_cpus=1)
          .map_batches(TTAPredictor, batch_size=cfg.infer.batch_size, batch_format="numpy",
                       compute=ray.data.ActorPoolStrategy(size=n),
                       fn_constructor_kwargs={
                           "checkpoint": checkpoint, "num_classes": num_classes,
                           "infer": to_dict(cfg.infer), "mean": list(cfg.data.mean),
                           "std": list(cfg.data.std), "torch_threads": torch_threads},
                       **resources))
    return ds.iter_batches(batch_size=None, batch_format="numpy")


def _write_stream(batches, scores, vid: str, split: str, pred_dir: Path,
                  video_frames: dict[str, int], skipped: dict[str, list[str]], progress,
                  start: float) -> _Throughput:
    """Write each frame's PNG as it arrives and each video's Parquet file once all its frames
    have (the stream is ordered); bad frames are added to ``skipped``."""
    rate = _Throughput()
    first = None
    pending: dict[str, list[dict]] = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)
    total = sum(video_frames.values())
    for batch in batches:
        if first is None:
            first, rate.first_count = time.perf_counter(), len(batch["frame"])
        for i in range(len(batch["frame"])):
            video, name = str(batch["video"][i]), str(batch["frame"][i])
            seen[video] += 1
            if batch["error"][i]:
                print(f"skipped: {batch['error'][i]}", flush=True)
                skipped.setdefault(video, []).append(name)
            else:
                _write_png(pred_dir / video / f"{name}.png", bytes(batch["png"][i]))
                pending[video].append({
                    "video": video, "frame": name, "height": int(batch["height"][i]),
                    "width": int(batch["width"][i]),
                    "score_height": int(batch["score_height"][i]),
                    "score_width": int(batch["score_width"][i]),
                    "classes": bytes(batch["classes"][i]), "codes": bytes(batch["codes"][i])})
            rate.written += 1
            if seen[video] == video_frames[video]:  # the video is complete
                scores.write_video(vid, split, video, pending.pop(video))
            if progress:
                progress(rate.written, total)
    now = time.perf_counter()
    rate.elapsed, rate.steady = now - start, (now - first if first else 0.0)
    return rate


def _log_run(cfg: ExperimentConfig, storage: str, vid: str, split: str, checkpoint: str,
             store_uri: str, rate: _Throughput, store_bytes: int, frames: int,
             metrics: dict | None) -> str:
    """One MLflow run per member and split (resumed when re-run): throughput, store size,
    metrics from the stored scores."""
    from vspw_ray import tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri, storage)
    experiment = cfg.tracking.experiment or cfg.name
    tags = {"variant_id": vid, "stage": "infer", "split": split}
    params = {"checkpoint": checkpoint, "store": store_uri,
              "tta.scales": str(list(cfg.infer.scales)), "tta.flip": str(cfg.infer.flip),
              **{f"encoding.{k}": str(v) for k, v in score_encoding(cfg.infer).to_dict().items()}}
    with tracking.open_run(uri, experiment, storage, run_id=tracking.find_run(uri, experiment, tags),
                           run_name=f"{vid}-infer-{split}", tags=tags, params=params) as rid:
        numbers = {"frames": rate.written, "frames_per_s": rate.fps, "store_bytes": store_bytes,
                   "store_bytes_per_frame": store_bytes / max(1, frames)}
        if rate.steady > 0 and rate.written > rate.first_count:
            numbers["frames_per_s_steady"] = rate.fps_steady
        if metrics:
            numbers.update({f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, float)})
        tracking.log_metrics(uri, rid, numbers, 0)
    return rid


def _has_masks(frames: list[Frame]) -> bool:
    """Whether the split has ground truth (val does, test does not): its first frame tells."""
    return bool(frames) and frames[0].mask is not None and Path(frames[0].mask).is_file()


def _store_metrics(scores, vid: str, root: str, split: str) -> dict[str, Any]:
    from vspw_ray.evaluate import evaluate_store_folds

    out = {}
    for fold, report in evaluate_store_folds(scores.uri, vid, root, split).items():
        prefix = f"val_{fold}/" if fold else ""
        for key in ("miou", "fwiou", "pixel_acc", "vc8", "vc16"):
            if report[key] is not None:
                out[f"{prefix}{key}"] = report[key]
    return out
