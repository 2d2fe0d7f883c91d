"""`vspw-ray evaluate`: the official VSPW metrics of prediction PNGs against a split.

Predictions are ``PRED/<video>/<frame>.png`` holding reduced class ids (0..C-1), as written by
``vspw-ray infer`` and expected by the VSPW server. Videos are scored in parallel processes, one
frame at a time, so memory does not grow with the number of frames.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from vspw_ray.data.layout import (
    DataError,
    Frame,
    fold_videos,
    list_frames,
    load_class_table,
    read_raw_mask,
    read_split,
)
from vspw_ray.labels import class_labels
from vspw_ray.metrics import ConfusionMatrix, VideoConsistency, summarize
from vspw_ray.parallel import map_videos
from vspw_ray.scores.encoding import decode
from vspw_ray.scores.store import ScoreStore

__all__ = ["evaluate_predictions", "evaluate_store", "evaluate_store_folds", "video_confusions", "format_report",
           "read_prediction", "write_report"]

VC_WINDOWS = (8, 16)


def read_prediction(path: Path, video: str, frame: str, shape: tuple[int, int]) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"prediction for video '{video}' frame '{frame}' is missing: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise DataError(f"prediction {path} has mode {im.mode}; write 8-bit class ids")
            pred = np.asarray(im)
    except OSError as err:
        raise DataError(f"prediction {path} cannot be read: {err}") from None
    if pred.shape != shape:
        raise DataError(f"prediction {path} is {pred.shape[1]}x{pred.shape[0]} but the frame "
                        f"is {shape[1]}x{shape[0]}")
    return pred


def _store_predictions(frames: list[Frame], store: str, vid: str, split: str):
    """Argmax at full size of a member's stored scores, frame by frame."""

    scores = ScoreStore(store)
    enc, num_classes = scores.encoding(vid), scores.manifest(vid)["num_classes"]
    stored = dict(scores.read_video(vid, split, frames[0].video)) if frames else {}
    for frame in frames:
        if frame.name not in stored:
            raise DataError(f"member '{vid}' has no scores for video '{frame.video}' frame "
                            f"'{frame.name}' in {store}")
        yield class_labels(decode(stored[frame.name], num_classes, enc), 0).numpy().astype(np.uint8)


def _evaluate_video(frames: list[Frame], source: tuple, num_classes: int):
    cm, vc = ConfusionMatrix(num_classes), VideoConsistency(VC_WINDOWS)
    stored = _store_predictions(frames, *source[1:]) if source[0] == "store" else None
    for frame in frames:
        video = frame.video
        raw = read_raw_mask(frame)
        if stored is not None:
            pred = next(stored)
            if pred.shape != raw.shape:
                raise DataError(f"stored scores of video '{video}' frame '{frame.name}' are "
                                f"{pred.shape} but the frame is {raw.shape}")
        else:
            pred = read_prediction(Path(source[1]) / video / f"{frame.name}.png", video,
                                   frame.name, raw.shape)
        try:
            cm.update(pred, raw, raw=True)
        except ValueError as err:
            raise DataError(f"prediction for video '{video}' frame '{frame.name}': {err}") from None
        vc.update(raw, pred)
    vc.end_video()
    return cm.matrix, vc.accs


def evaluate_predictions(pred_dir: str | Path, root: str | Path, split: str, *,
                         fold: str | None = None, fold_seed: int = 0,
                         processes: int | None = None, progress=None) -> dict:
    """Official metrics of ``pred_dir`` on a split (or one fold of it).

    Returns :func:`vspw_ray.metrics.summarize`'s dict plus ``frames``, ``videos`` and the
    ``confusion`` matrix (a nested list).
    """
    pred_dir, root = Path(pred_dir), Path(root)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    table = load_class_table(root)
    videos = fold_videos(read_split(root, split), fold, fold_seed)
    # report every missing prediction up front instead of failing halfway through
    by_video = [list_frames(root, video, require_masks=True) for video in videos]
    missing = [f"{f.video}/{f.name}.png" for frames in by_video for f in frames
               if not (pred_dir / f.video / f"{f.name}.png").is_file()]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} prediction frames are missing under {pred_dir}: {shown}")
    return _evaluate(("png", str(pred_dir)), videos, by_video, table, split, {fold: videos},
                     processes, progress)[fold]


def _evaluate(source: tuple, videos: list[str], by_video: list[list[Frame]], table, split: str,
              folds: dict[str | None, list[str]], processes: int | None, progress) -> dict:
    """One report per entry of ``folds`` (fold name -> its videos) from one pass over
    ``videos``: each video is scored once and added to every fold that holds it."""
    totals = {fold: (ConfusionMatrix(table.num_classes), VideoConsistency(VC_WINDOWS))
              for fold in folds}
    sets = {fold: set(members) for fold, members in folds.items()}
    holders = {v: [fold for fold, members in sets.items() if v in members] for v in videos}
    jobs = [(frames, source, table.num_classes) for frames in by_video]
    results = map_videos(_evaluate_video, jobs, processes=processes, progress=progress,
                         frames=[len(frames) for frames in by_video])
    for video, (matrix, accs) in zip(videos, results):
        for fold in holders[video]:
            cm, vc = totals[fold]
            cm.matrix += matrix
            vc.merge(VideoConsistency(VC_WINDOWS, accs))
    frames = dict(zip(videos, map(len, by_video)))
    reports = {}
    for fold, (cm, vc) in totals.items():
        report = summarize(cm.matrix, table.names, vc)
        report.update(frames=sum(frames[v] for v in folds[fold]), videos=len(folds[fold]),
                      split=split, fold=fold or "all", confusion=cm.matrix.tolist())
        reports[fold] = report
    return reports


def evaluate_store(store: str | Path, variant: str, root: str | Path, split: str, *,
                   fold: str | None = None, fold_seed: int = 0, processes: int | None = None,
                   progress=None) -> dict:
    """Official metrics of one member's stored scores (argmax of the decoded distributions at
    each frame's size) on a split or one fold of it."""
    return evaluate_store_folds(store, variant, root, split, folds=(fold,), fold_seed=fold_seed,
                                processes=processes, progress=progress)[fold]


def evaluate_store_folds(store: str | Path, variant: str, root: str | Path, split: str, *,
                         folds=("A", "B", None), fold_seed: int = 0,
                         processes: int | None = None, progress=None) -> dict:
    """:func:`evaluate_store` for several folds (``None``: the whole split) at once, reading
    and decoding every frame's scores once: ``{fold: report}``."""

    root = Path(root)
    table = load_class_table(root)
    names = ScoreStore(str(store)).manifest(variant)["class_names"]
    if list(names) != list(table.names):
        raise DataError(f"member '{variant}' was stored with classes {names[:5]}... but {root} "
                        f"has {table.names[:5]}...: a different class table")
    split_videos = read_split(root, split)
    members = {fold: fold_videos(split_videos, fold, fold_seed) for fold in folds}
    videos = [v for v in split_videos if any(v in m for m in members.values())]
    by_video = [list_frames(root, video, require_masks=True) for video in videos]
    return _evaluate(("store", str(store), variant, split), videos, by_video, table, split,
                     members, processes, progress)


def video_confusions(store: str | Path, variant: str, root: str | Path, split: str,
                     videos: list[str] | None = None, *, processes: int | None = None,
                     progress=None) -> dict[str, np.ndarray]:
    """Each video's official confusion matrix ``[C, C]`` of one member's stored scores (the
    matrices :func:`evaluate_store` sums), for bootstrap intervals over videos."""
    root = Path(root)
    table = load_class_table(root)
    videos = list(videos) if videos is not None else read_split(root, split)
    jobs = [(list_frames(root, v, require_masks=True), ("store", str(store), variant, split),
             table.num_classes) for v in videos]
    results = map_videos(_evaluate_video, jobs, processes=processes, progress=progress,
                         frames=[len(job[0]) for job in jobs])
    return {v: matrix for v, (matrix, _) in zip(videos, results)}


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{100 * x:6.2f}"


def format_report(report: dict) -> str:
    """A readable table: headline metrics, then per-class IoU sorted from worst to best."""
    lines = [
        f"split {report.get('split', '?')} fold {report.get('fold', 'all')}: "
        f"{report.get('videos', '?')} videos, {report.get('frames', '?')} frames",
        f"  mIoU {_pct(report['miou'])}   fwIoU {_pct(report['fwiou'])}   "
        f"pixel acc {_pct(report['pixel_acc'])}   VC8 {_pct(report['vc8'])}   "
        f"VC16 {_pct(report['vc16'])}",
        "",
        f"  {'class':<28} {'IoU %':>6}",
    ]
    items = sorted(report["per_class_iou"].items(),
                   key=lambda kv: (kv[1] is None, kv[1] if kv[1] is not None else 0.0))
    for name, iou in items:
        lines.append(f"  {name:<28} {_pct(iou)}" + ("  (absent from ground truth)" if iou is None else ""))
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))
