"""The chosen weights at full resolution: one pass over the store that decodes each member once
per frame, forms the group means once, and labels every frame three ways -- the ensemble, the
best single member and the plain mean of all members -- accumulating the official confusion
matrices and video consistency per fold. The submission labels frames with the same code.

Group means and the weighted sum are formed exactly as :func:`vspw_ray.ensemble.fusion.group_means`
and the one-pass grid form them (same float32 operations in the same order), so the fold-A mIoU
of a grid point equals the rescored one bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vspw_ray.ensemble.fusion import LOG_FLOOR, fuse_arrays
from vspw_ray.errors import StoreError

__all__ = ["FusionPlan", "VARIANTS", "frame_labels", "video_scores", "RescoreJob",
           "run_rescore_job", "rescore"]

VARIANTS = ("ensemble", "single", "mean")  # what each frame is labelled as
VC_WINDOWS = (8, 16)


@dataclass(frozen=True)
class FusionPlan:
    """How to label a frame from its members' stored scores."""

    groups: dict[str, list[str]]  # group -> member keys, the base group first
    weights: tuple[float, ...]  # the K-1 free weights, in the groups' order after the base
    space: str  # "prob" | "log"
    num_classes: int
    members: tuple[str, ...] = ()  # every member: the plain mean (baselines only)
    best: str | None = None  # the best single member on fold A (baselines only)
    names: dict[str, str] = field(default_factory=dict)  # key -> the user's name, for errors

    @property
    def used(self) -> list[str]:
        """Members to decode: the grouped ones, then the rest of the baselines'."""
        grouped = [m for ms in self.groups.values() for m in ms]
        return grouped + [m for m in (*self.members, *([self.best] if self.best else []))
                          if m not in grouped]


def _argmax_u8(scores) -> np.ndarray:
    return np.asarray(scores).argmax(0).astype(np.uint8)


def frame_labels(plan: FusionPlan, encoded: Mapping, encodings: Mapping) -> dict[str, np.ndarray]:
    """``{"ensemble": [H, W] uint8, "single": ..., "mean": ...}`` reduced ids of one frame
    (only ``"ensemble"`` when the plan has no baselines). ``encoded``: member key ->
    :class:`vspw_ray.scores.EncodedScores`; ``encodings``: member key -> its encoding."""
    from vspw_ray.scores.encoding import decode

    group_of = {m: g for g, ms in plan.groups.items() for m in ms}
    totals, everything, out = {}, None, {}
    for m in plan.used:
        p = decode(encoded[m], plan.num_classes, encodings[m]).float()
        if m == plan.best:
            out["single"] = _argmax_u8(p.numpy())
        s = p.clamp_min(LOG_FLOOR).log() if plan.space == "log" else p
        g = group_of.get(m)
        if g is not None:
            totals[g] = s.clone() if g not in totals else totals[g].add_(s)
        if m in plan.members:
            everything = s.clone() if everything is None else everything.add_(s)
    means = [totals[g].div_(len(ms)).numpy() for g, ms in plan.groups.items()]
    out["ensemble"] = _argmax_u8(fuse_arrays(means, plan.weights))
    if everything is not None:
        out["mean"] = _argmax_u8(everything.numpy())
    return out


def video_scores(store, plan: FusionPlan, split: str, video: str,
                 frames: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """``(frame, {member key: encoded scores})`` for each of ``frames`` in order.

    Raises:
        StoreError: a member has no scores for one of the frames, or scores for a frame the
            dataset does not have; the message names the member, video and frame.
    """
    stored = {m: dict(store.read_video(m, split, video)) for m in plan.used}
    for m, by_frame in stored.items():
        name = plan.names.get(m, m)
        missing = [f for f in frames if f not in by_frame]
        if missing:
            raise StoreError(f"member '{name}' ({m}) has no {split} scores for video '{video}' "
                             f"frame '{missing[0]}' ({len(missing)} frames missing); re-run "
                             f"vspw-ray infer --variant {name} --split {split}")
        extra = sorted(set(by_frame) - set(frames))
        if extra:
            raise StoreError(f"member '{name}' ({m}) holds {split} scores for video '{video}' "
                             f"frame '{extra[0]}', which the dataset does not have; re-run "
                             f"vspw-ray infer for it on this dataset")
    for f in frames:
        yield f, {m: stored[m][f] for m in plan.used}


@dataclass(frozen=True)
class RescoreJob:
    """One shard of the rescoring pass."""

    store: str
    root: str
    split: str
    videos: list[str]  # in split order
    folds: dict[str, str]  # video -> "A" | "B"
    frames: dict[str, list[str]]  # video -> frame names
    plan: FusionPlan


def run_rescore_job(job: RescoreJob) -> tuple[dict[tuple[str, str], tuple[np.ndarray, dict]],
                                               dict[tuple[str, str], np.ndarray]]:
    """``{(variant, fold): (confusion [C, C] int64, VC accumulators)}`` of one shard, and
    ``{(variant, video): confusion}`` of each of its videos."""
    from vspw_ray.data import list_frames, read_raw_mask
    from vspw_ray.data.layout import DataError
    from vspw_ray.metrics import ConfusionMatrix, VideoConsistency
    from vspw_ray.scores.store import ScoreStore

    store = ScoreStore(job.store)
    encodings = {m: store.encoding(m) for m in job.plan.used}
    c = job.plan.num_classes
    acc = {(v, f): (ConfusionMatrix(c), VideoConsistency(VC_WINDOWS))
           for v in VARIANTS for f in set(job.folds.values())}
    per_video = {}
    for video in job.videos:
        fold, listed = job.folds[video], {f.name: f for f in list_frames(job.root, video)}
        mine = {v: ConfusionMatrix(c) for v in VARIANTS}
        for name, encoded in video_scores(store, job.plan, job.split, video, job.frames[video]):
            raw = read_raw_mask(listed[name])
            for variant, pred in frame_labels(job.plan, encoded, encodings).items():
                if pred.shape != raw.shape:
                    raise DataError(f"stored scores of video '{video}' frame '{name}' are "
                                    f"{pred.shape} but the mask is {raw.shape}")
                mine[variant].update(pred, raw, raw=True)
                acc[variant, fold][1].update(raw, pred)
        for variant in VARIANTS:
            acc[variant, fold][0].matrix += mine[variant].matrix
            acc[variant, fold][1].end_video()
            per_video[variant, video] = mine[variant].matrix
    return {k: (cm.matrix, vc.accs) for k, (cm, vc) in acc.items()}, per_video


def rescore(store: str, root: str, split: str, folds: Mapping[str, Sequence[str]],
            frames: Mapping[str, list[str]], plan: FusionPlan, shards: int,
            map_fn) -> tuple[dict[str, dict[str, tuple[np.ndarray, object]]],
                             dict[str, dict[str, np.ndarray]]]:
    """``{variant: {fold: (confusion [C, C], VideoConsistency)}}`` over the folds' videos,
    and ``{variant: {video: confusion}}`` (what bootstrap intervals over videos resample),
    from one pass sharded into ``shards`` jobs run by ``map_fn(run_rescore_job, jobs)``.
    Shards are merged in video order, as ``vspw-ray evaluate`` merges videos."""
    from vspw_ray.ensemble.grid import shard_videos
    from vspw_ray.metrics import VideoConsistency

    fold_of = {v: f for f, vs in folds.items() for v in vs}
    videos = [v for v in frames if v in fold_of]
    jobs = [RescoreJob(store, root, split, shard, {v: fold_of[v] for v in shard},
                       {v: frames[v] for v in shard}, plan)
            for shard in shard_videos(videos, shards)]
    total = {v: {f: (np.zeros((plan.num_classes,) * 2, np.int64), VideoConsistency(VC_WINDOWS))
                 for f in folds} for v in VARIANTS}
    by_video: dict[str, dict[str, np.ndarray]] = {v: {} for v in VARIANTS}
    for part, videos_part in map_fn(run_rescore_job, jobs):
        for (variant, fold), (matrix, accs) in part.items():
            cm, vc = total[variant][fold]
            cm += matrix
            vc.merge(VideoConsistency(VC_WINDOWS, accs))
        for (variant, video), matrix in videos_part.items():
            by_video[variant][video] = matrix
    return total, by_video
