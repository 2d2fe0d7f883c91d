"""`vspw-ray infer`: TTA inference of one checkpoint over a split as a Ray Data job.

Frames are listed on the driver, decoded in CPU tasks (``map_batches`` over a function), and run
through a pool of model actors (``map_batches`` with a callable class; one GPU each on a
cluster, and on a CPU machine the CPUs left after one for the reads) that apply flip x scale
TTA and encode the averaged class distributions (:mod:`vspw_ray.scores.encoding`). The stream
is ordered, so the driver sees each video's frames together: it writes the video's prediction
PNGs and its Parquet file (:mod:`vspw_ray.scores.store`) as soon as the video is complete, and
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

from vspw_ray import tracking
from vspw_ray.checkpoints import checkpoint_file, read_state, read_summary
from vspw_ray.config import (
    ExperimentConfig,
    InferConfig,
    config_from_dict,
    resolve_variant,
    to_dict,
    variant_fingerprint,
)
from vspw_ray.cost import Held, measured_cost
from vspw_ray.data import load_class_table, read_split, split_frames
from vspw_ray.data.fingerprint import split_fingerprint
from vspw_ray.data.layout import DataError, Frame, read_image
from vspw_ray.evaluate import evaluate_store_folds
from vspw_ray.ids import member_key, tta_hash
from vspw_ray.infer.tta import tta_frames
from vspw_ray.labels import class_labels
from vspw_ray.models import build_model
from vspw_ray.precision import autocast_context
from vspw_ray.runtime import Prepared, prepare_stage, stage_run
from vspw_ray.scores.encoding import ScoreEncoding, encode
from vspw_ray.scores.store import (
    ENCODING_DOC,
    ENCODING_NAME,
    SCHEMA_DOC,
    ScoreStore,
    StoreError,
    frame_row,
)
from vspw_ray.storage import filesystem, is_uri, write_atomic
from vspw_ray.stored_models import model_checkpoint

__all__ = ["InferResult", "run_inference", "load_inference_model", "decode_frames",
           "TTAPredictor", "num_actors"]

log = logging.getLogger("vspw_ray.infer")


def load_inference_model(checkpoint: str, num_classes: int, device: str = "cpu"):
    """The model of a training/SWA checkpoint, built from the config stored in it, in eval
    mode; returns ``(model, checkpoint config)``."""
    import torch

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
                 torch_threads: int = 1, system_metrics: dict | None = None):
        import ray
        import torch

        self._stop_metrics = None  # this node's system metrics (tracking.system_metrics)
        if system_metrics:
            node = f"node-{ray.get_runtime_context().get_node_id()[:8]}"
            self._stop_metrics = tracking.node_system_metrics(**system_metrics, node_id=node)

        torch.set_num_threads(torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, _ = load_inference_model(checkpoint, num_classes, str(self.device))
        self.infer = InferConfig(**{**infer, "scales": tuple(infer["scales"])})
        self.enc = ScoreEncoding.of(self.infer)
        self.mean, self.std = mean, std
        self.autocast, _ = autocast_context(self.device, "auto")

    def __del__(self) -> None:  # a last sample when Ray Data lets the actor go
        if getattr(self, "_stop_metrics", None):
            self._stop_metrics()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        n = len(batch["error"])
        pngs, classes, codes = [b""] * n, [b""] * n, [b""] * n
        sh, sw = [0] * n, [0] * n
        good = [i for i in range(n) if not batch["error"][i]]
        frames = [np.frombuffer(batch["image"][i], np.uint8).reshape(
            int(batch["height"][i]), int(batch["width"][i]), 3) for i in good]
        # the frames of one size in batches, each scale's flip pair in one forward
        for k, probs in tta_frames(self.model, frames, mean=self.mean, std=self.std,
                                   scales=self.infer.scales, flip=self.infer.flip,
                                   autocast=self.autocast, device=self.device,
                                   batch_size=self.infer.batch_size):
            i = good[k]
            pred = class_labels(probs, 0).to(torch.uint8).cpu().numpy()
            buf = io.BytesIO()
            Image.fromarray(pred, mode="L").save(buf, format="PNG")
            pngs[i] = buf.getvalue()
            enc = encode(probs, self.enc)
            classes[i], codes[i] = enc.classes.tobytes(), enc.codes.tobytes()
            sh[i], sw[i] = enc.classes.shape[1], enc.classes.shape[2]
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
    key: str  # the store member: checkpoint identity + infer settings
    variant_id: str  # the checkpoint's variant
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


@dataclass(frozen=True)
class _Member:
    """The checkpoint being inferred and where its outputs go."""

    checkpoint: str  # its checkpoint.pt
    header: dict  # its summary (variant_id, iteration, kind, family, ...)
    key: str  # the store member key: checkpoint identity + infer settings + split data
    store: str
    predictions: str
    data_fingerprint: str  # of the inferred split (the class table and its videos' frames)
    transfer: str  # "same data" | "other data" | "unknown": the weights' training data

    @property
    def data_tags(self) -> dict[str, str]:
        """For the manifest and the MLflow tags: the split's fingerprint, the one of the data
        the weights learnt from, and whether that is this dataset's (``infer --checkpoint`` of
        weights from other data is allowed, and recorded as a transfer)."""
        return {"data_fingerprint": self.data_fingerprint,
                "checkpoint_data_fingerprint": self.header.get("data_fingerprint") or "unknown",
                "transfer": self.transfer}


def _member(stage: Prepared, checkpoint: str | None, resolved: ExperimentConfig | None, split: str,
            store: str | None, predictions: str | None) -> _Member:
    """The checkpoint to infer (``checkpoint``, else the model checkpoint of the ``resolved``
    variant in the run layout) and its member key and output locations."""

    if checkpoint is None:
        checkpoint = model_checkpoint(stage.layout, resolved)
    elif not is_uri(checkpoint):
        checkpoint = str(Path(checkpoint).expanduser().resolve())
    checkpoint = checkpoint_file(checkpoint)
    header = read_summary(checkpoint)
    if not header.get("variant_id"):
        raise ValueError(f"{checkpoint} records no variant_id; infer needs a vspw_ray checkpoint")
    data = split_fingerprint(stage.cfg.data.root, split)
    key = member_key(header["variant_id"], header.get("iteration") or 0, stage.cfg.infer, data)
    return _Member(checkpoint, header, key, store or stage.layout.scores,
                   predictions or stage.layout.predictions(key, split), data,
                   _transfer(stage.cfg, header.get("data_fingerprint")))


def _transfer(cfg: ExperimentConfig, trained: str | None) -> str:
    """Whether weights that learnt from data ``trained`` (a variant fingerprint) learnt from
    this dataset's training and val splits."""

    if not trained:
        return "unknown"
    try:
        return "same data" if trained == variant_fingerprint(cfg) else "other data"
    except DataError:  # a dataset without the config's training split: nothing to compare
        return "other data"


def run_inference(cfg: ExperimentConfig, checkpoint: str | None, split: str, *,
                  variant: str | None = None, store: str | None = None,
                  predictions: str | None = None, address: str | None = None,
                  track: bool = True, torch_threads: int = 1, progress=None,
                  label: str | None = None, parent_run: str | None = None) -> InferResult:
    """Infer ``checkpoint`` (default: the model checkpoint of ``variant`` in the run layout:
    its SWA average, else its best training checkpoint) over ``split`` into the score store and
    prediction PNGs, keyed by the checkpoint and the ``infer`` settings; videos already stored
    under that key are skipped. Metrics from the stored scores when the split has masks.
    ``label`` names the run in MLflow (``<label>/infer-<split>``; default the variant's name,
    or the experiment's); ``parent_run`` the MLflow run its run is a child of (the pipeline's).
    """

    # the variant as the user wrote it: its id is computed before paths are made absolute, as
    # train does
    resolved = None if checkpoint else resolve_variant(cfg, variant)
    prep = prepare_stage(resolved or config_from_dict({**to_dict(cfg), "variants": []}),
                         address=address, track=track, trainable=False)
    member = _member(prep, checkpoint, resolved, split, store, predictions)
    cfg = prep.cfg
    table = load_class_table(cfg.data.root)
    videos = read_split(cfg.data.root, split)
    frames = split_frames(cfg.data.root, split)
    by_video: dict[str, list[Frame]] = defaultdict(list)
    for f in frames:
        by_video[f.video].append(f)
    scores = ScoreStore(member.store)
    manifest, skipped, todo = _plan(cfg, member, scores, table, split, videos, by_video)
    tags = {"variant_id": member.header["variant_id"], "member_key": member.key, "split": split}
    label = label or variant or cfg.name
    with stage_run(prep, "infer", tags, track=track, connect=bool(todo),
                   run_name=f"{label}/infer-{split}", params=_run_params(cfg, member),
                   extra_tags={**member.data_tags, "variant": label}, parent=parent_run) as stage:
        rate, start = _Throughput(), time.perf_counter()
        if todo:
            batches, held = _pipeline(cfg, [f for v in todo for f in by_video[v]],
                                      member.checkpoint, table.num_classes, stage.address,
                                      torch_threads, _node_metrics(cfg, stage))
            with measured_cost(stage.tracking_uri, stage.run_id, held):  # while frames stream
                rate = _write_stream(batches, scores, member, split,
                                     {v: len(by_video[v]) for v in todo}, skipped, progress,
                                     start)
        manifest["splits"][split] = {
            "videos": len(videos), "frames": sum(len(by_video[v]) for v in videos),
            "skipped": {v: n for v, n in skipped.items() if n}}
        scores.write_manifest(member.key, manifest)
        metrics = _split_metrics(scores, member.key, cfg, split, frames, skipped)
        manifest["splits"][split]["metrics"] = metrics
        store_bytes = scores.size_bytes(member.key, split)
        if stage.run_id:
            _log_run(stage, rate, store_bytes, manifest["splits"][split]["frames"], split, metrics)
            manifest["mlflow_run_id"] = stage.run_id
        scores.write_manifest(member.key, manifest)
    return InferResult(member.key, member.header["variant_id"], split, member.store,
                       member.predictions, rate.written,
                       [f"{v}/{n}" for v, ns in skipped.items() for n in ns], rate.fps,
                       rate.fps_steady, store_bytes, metrics, stage.run_id)


def _node_metrics(cfg: ExperimentConfig, stage) -> dict | None:
    """Where the model actors log their nodes' system metrics, when ``tracking.system_metrics``
    is on and the run is tracked (the driver samples its own node through its run)."""
    if not (cfg.tracking.system_metrics and stage.run_id):
        return None
    return {"uri": stage.tracking_uri, "run_id": stage.run_id,
            "interval_s": tracking.system_metrics_interval()}


def _plan(cfg: ExperimentConfig, member: _Member, scores, table, split: str,
          videos: list[str], by_video: dict[str, list[Frame]]):
    """The member's manifest, the frames skipped before, and the videos left to infer (those
    whose Parquet file and PNGs are not both complete)."""
    try:
        previous = scores.manifest(member.key)
    except StoreError:
        previous = {}
    skipped_before = previous.get("splits", {}).get(split, {}).get("skipped", {})
    expected = {v: len(by_video[v]) - len(skipped_before.get(v, [])) for v in videos}
    fs, pred_root = filesystem(member.predictions)
    done = {v for v in scores.done_videos(member.key, split, expected)
            if _pngs_present(fs, f"{pred_root}/{v}", by_video[v], skipped_before.get(v, []))}
    todo = [v for v in videos if v not in done]
    print(f"infer {member.key} on {split}: {len(videos)} videos, {len(done)} already stored, "
          f"{len(todo)} to run", flush=True)
    manifest = _manifest(cfg, member, table, previous)
    return manifest, {v: list(n) for v, n in skipped_before.items()}, todo


def _pngs_present(fs, folder: str, frames: list[Frame], skipped: list[str]) -> bool:
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
    present = {i.base_name for i in infos if i.type == pyarrow.fs.FileType.File}
    return all(f"{f.name}.png" in present for f in frames if f.name not in skipped)


def _split_metrics(scores, key: str, cfg: ExperimentConfig, split: str, frames: list[Frame],
                   skipped: dict[str, list[str]]) -> dict | None:
    n_skipped = sum(len(v) for v in skipped.values())
    if n_skipped:
        print(f"no {split} metrics: {n_skipped} frames were skipped", flush=True)
        return None
    if not _has_masks(frames):
        return None
    return _store_metrics(scores, key, cfg.data.root, split, cfg.data.fold_seed)


def _manifest(cfg: ExperimentConfig, member: _Member, table, previous: dict) -> dict[str, Any]:
    """The member's manifest: what produced its scores and how to read them; the other
    splits' entries and the MLflow run are carried over from ``previous``."""
    header = member.header
    return {
        "key": member.key, "variant_id": header["variant_id"],
        "parent_variant_id": header.get("parent_variant_id"),
        "checkpoint": member.checkpoint, "checkpoint_iteration": header.get("iteration"),
        "checkpoint_kind": header.get("kind", "train"),
        "family": header.get("family"), "train_split": header.get("train_split"),
        "data_root": cfg.data.root, "fold_seed": cfg.data.fold_seed,
        **member.data_tags,  # the split's data; the checkpoint's training data
        "class_names": table.names, "num_classes": table.num_classes,
        "infer_hash": tta_hash(cfg.infer),
        "tta": {"scales": list(cfg.infer.scales), "flip": cfg.infer.flip},
        "encoding": {"name": ENCODING_NAME, "params": ScoreEncoding.of(cfg.infer).to_dict(),
                     "doc": ENCODING_DOC},
        "schema": SCHEMA_DOC,
        "splits": {**previous.get("splits", {})},
        "mlflow_run_id": previous.get("mlflow_run_id"),
    }


def _pipeline(cfg: ExperimentConfig, frames: list[Frame], checkpoint: str, num_classes: int,
              address: str | None, torch_threads: int, system_metrics: dict | None = None):
    """The Ray Data job over ``frames``, in order: decode tasks, then the TTA actor pool; an
    iterator over its output batches, and what the actor pool holds. ``system_metrics``
    (``uri``, ``run_id``, ``interval_s``): the actors log their nodes' system metrics there, one
    actor per node."""
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
                           "std": list(cfg.data.std), "torch_threads": torch_threads,
                           "system_metrics": system_metrics},
                       **resources))
    held = Held(n * resources["num_cpus"], n * resources.get("num_gpus", 0))
    return ds.iter_batches(batch_size=None, batch_format="numpy"), held


def _write_stream(batches, scores, member: _Member, split: str, video_frames: dict[str, int],
                  skipped: dict[str, list[str]], progress, start: float) -> _Throughput:
    """Write each frame's PNG as it arrives and each video's Parquet file once all its frames
    have (the stream is ordered); bad frames are added to ``skipped``."""
    fs, pred_root = filesystem(member.predictions)
    rate, first = _Throughput(), None
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
                write_atomic(fs, f"{pred_root}/{video}/{name}.png", bytes(batch["png"][i]))
                pending[video].append(frame_row(
                    video, name, int(batch["height"][i]), int(batch["width"][i]),
                    bytes(batch["classes"][i]), bytes(batch["codes"][i]),
                    int(batch["score_height"][i]), int(batch["score_width"][i])))
            rate.written += 1
            if seen[video] == video_frames[video]:  # the video is complete
                scores.write_video(member.key, split, video, pending.pop(video))
            if progress:
                progress(rate.written, total)
    now = time.perf_counter()
    rate.elapsed, rate.steady = now - start, (now - first if first else 0.0)
    return rate


def _run_params(cfg: ExperimentConfig, member: _Member) -> dict[str, str]:
    return {"checkpoint": member.checkpoint, "store": member.store,
            "tta.scales": str(list(cfg.infer.scales)), "tta.flip": str(cfg.infer.flip),
            **{f"encoding.{k}": str(v) for k, v in ScoreEncoding.of(cfg.infer).to_dict().items()}}


def _log_run(stage, rate: _Throughput, store_bytes: int, frames: int, split: str,
             metrics: dict | None) -> None:
    """Throughput, store size and the metrics from the stored scores, in the stage's run (one
    per member and split, resumed when re-run)."""

    numbers = {"frames": rate.written, "frames_per_s": rate.fps, "store_bytes": store_bytes,
               "store_bytes_per_frame": store_bytes / max(1, frames)}
    if rate.steady > 0 and rate.written > rate.first_count:
        numbers["frames_per_s_steady"] = rate.fps_steady
    if metrics:
        numbers.update({f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    tracking.log_metrics(stage.tracking_uri, stage.run_id, numbers, 0)


def _has_masks(frames: list[Frame]) -> bool:
    """Whether the split has ground truth (val does, test does not): its first frame tells."""
    return bool(frames) and frames[0].mask is not None and Path(frames[0].mask).is_file()


def _store_metrics(scores, key: str, root: str, split: str, fold_seed: int) -> dict[str, Any]:
    out = {}
    for fold, report in evaluate_store_folds(scores.uri, key, root, split,
                                             fold_seed=fold_seed).items():
        prefix = f"val_{fold}/" if fold else ""
        for key in ("miou", "fwiou", "pixel_acc", "vc8", "vc16"):
            if report[key] is not None:
                out[f"{prefix}{key}"] = report[key]
    return out
