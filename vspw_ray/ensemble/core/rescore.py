"""Candidate fusions at full resolution: one pass over the store that decodes each member once
per frame and labels every frame once per candidate (:mod:`vspw_ray.ensemble.core.candidates`),
accumulating each candidate's confusion matrix and video consistency per video, and how often
each pair of members agrees. The submission labels frames with the same code.

A plan fuses in one of two ways, each the same in rescoring and in the submission:

* **group means** (no inner shares): each group's scores summed in the decode order and divided
  by its size, then ``((P_0 + w_1 P_1) + w_2 P_2) ...`` -- the float32 operations of
  :func:`vspw_ray.ensemble.core.fusion.group_means` and the one-pass grid, so the fold-A mIoU of a
  grid point equals the rescored one bit for bit (groups list their members in the decode
  order: the stage sorts them so);
* **member level** (inner shares, or one member per group as greedy selection makes them):
  ``sum_m v_m P_m`` accumulated in the decode order.

Plans that share a group structure (the searched points of the grid or of Tune without inner
shares) are labelled together as the grid labels its points
(:func:`vspw_ray.ensemble.core.grid.point_labels`): one corner pass settles most pixels, and only the
contested ones are fused per plan, over their candidate classes; the labels are the same bits.

Memory: a frame holds one ``[C, H, W]`` float32 sum per distinct group and per member-level
plan; singles are labelled as their member is decoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vspw_ray.data import list_frames, read_raw_mask
from vspw_ray.data.layout import DataError
from vspw_ray.ensemble.core.fusion import LOG_FLOOR, fuse_arrays, score_bound
from vspw_ray.ensemble.core.grid import point_labels, shard_videos
from vspw_ray.errors import StoreError
from vspw_ray.labels import class_labels
from vspw_ray.metrics import VideoConsistency, confusion
from vspw_ray.scores.encoding import decode
from vspw_ray.scores.store import ScoreStore

__all__ = ["FusionPlan", "FrameFusion", "frame_labels", "video_scores", "RescoreJob",
           "run_rescore_job", "Rescored", "rescore", "VC_WINDOWS"]

VC_WINDOWS = (8, 16)
SHARED = 2  # plans of one group structure labelled together by the grid's corner pass


@dataclass(frozen=True)
class FusionPlan:
    """How to label a frame from its members' stored scores."""

    groups: dict[str, list[str]]  # group -> member keys, the base group first
    weights: tuple[float, ...]  # the K-1 free weights, in the groups' order after the base
    space: str  # "prob" | "log"
    num_classes: int
    inner: dict[str, float] = field(default_factory=dict)  # member -> share; {}: group means
    order: tuple[str, ...] = ()  # the decode order; (): the grouped members in group order
    names: dict[str, str] = field(default_factory=dict)  # key -> the user's name, for errors

    @property
    def used(self) -> list[str]:
        """Members to decode, in the decode order."""
        grouped = [m for ms in self.groups.values() for m in ms]
        return [m for m in self.order if m in grouped] if self.order else grouped

    @property
    def single(self) -> str | None:
        """The member of a one-member plan (its label is that member's argmax)."""
        ms = [m for ms in self.groups.values() for m in ms]
        return ms[0] if len(ms) == 1 else None

    @property
    def member_level(self) -> bool:
        return bool(self.inner) or (len(self.groups) > 1 and
                                    all(len(ms) == 1 for ms in self.groups.values()))

    def member_weights(self) -> dict[str, float]:
        base, out = next(iter(self.groups)), {}
        for j, (g, members) in enumerate(self.groups.items()):
            w = 1.0 if g == base else float(self.weights[j - 1])
            for m in members:
                out[m] = w * self.inner.get(m, 1.0 / len(members))
        return out


def _labels_u8(scores) -> np.ndarray:
    """The first-maximum class of ``scores [C, H, W]`` (a torch tensor) as uint8: torch's
    ``max(0).indices`` is the same index as numpy's ``argmax(0)`` and several times faster
    over the class dimension (:func:`vspw_ray.labels.class_labels`)."""
    return class_labels(scores, 0).numpy().astype(np.uint8)


class FrameFusion:
    """Labels one frame under several named plans from its members' probabilities, given one
    member at a time in the decode order (see the module docstring)."""

    def __init__(self, plans: Mapping[str, FusionPlan]):
        self.plans = dict(plans)
        spaces = {p.space for p in self.plans.values()}
        if len(spaces) > 1:
            raise ValueError(f"plans fused in one pass share one space, got {sorted(spaces)}")
        self.space = spaces.pop() if spaces else "prob"
        self.singles = {n: p.single for n, p in self.plans.items() if p.single}
        self.member = {n: p.member_weights() for n, p in self.plans.items()
                       if p.member_level and n not in self.singles}
        self.grouped = {n: p for n, p in self.plans.items()
                        if n not in self.singles and n not in self.member}
        self.keys = {tuple(ms) for p in self.grouped.values() for ms in p.groups.values()}
        shapes: dict[tuple, list[str]] = {}
        for name, p in self.grouped.items():
            shapes.setdefault(tuple(tuple(ms) for ms in p.groups.values()), []).append(name)
        self.shared = {shape: names for shape, names in shapes.items()
                       if len(names) >= SHARED and len(shape) > 1}

    def labels(self, decoded: Iterable[tuple[str, object]]) -> dict[str, np.ndarray]:
        """``{plan name: [H, W] uint8}`` from ``(member, probabilities [C, H, W])`` pairs."""
        out, sums, acc, owned = {}, {}, {}, set()
        for m, p in decoded:
            p = p.float()
            s = p.clamp_min(LOG_FLOOR).log() if self.space == "log" else p
            for name, single in self.singles.items():
                if single == m:
                    out[name] = _labels_u8(s)
            for key in self.keys:  # a key's sum borrows its first member until a second comes
                if m not in key:
                    continue
                if key not in sums:
                    sums[key] = s
                elif key in owned:
                    sums[key].add_(s)
                else:
                    sums[key] = sums[key] + s
                    owned.add(key)
            for name, v in self.member.items():
                if v.get(m):
                    term = float(v[m]) * s
                    acc[name] = term if name not in acc else acc[name].add_(term)
        means = {key: total.div_(len(key)) if key in owned else total  # x / 1 == x
                 for key, total in sums.items()}
        for shape, names in self.shared.items():
            stack = [means[key].numpy().reshape(len(means[key]), -1) for key in shape]
            points = np.array([self.grouped[n].weights for n in names], np.float64)
            for name, labels in zip(names, point_labels(stack, points,
                                                          score_bound(self.space))):
                out[name] = labels.reshape(means[shape[0]].shape[1:])
        for name, plan in self.grouped.items():
            if name in out:
                continue
            fused = fuse_arrays([means[tuple(ms)] for ms in plan.groups.values()], plan.weights)
            out[name] = _labels_u8(fused)
        for name, total in acc.items():
            out[name] = _labels_u8(total)
        return out


def _decoded(order: Sequence[str], encoded: Mapping, encodings: Mapping, num_classes: int):
    for m in order:
        yield m, decode(encoded[m], num_classes, encodings[m])


def frame_labels(plan: FusionPlan, encoded: Mapping, encodings: Mapping) -> np.ndarray:
    """The fused labels ``[H, W]`` uint8 (reduced ids) of one frame under ``plan``.
    ``encoded``: member key -> :class:`vspw_ray.scores.EncodedScores`; ``encodings``: member
    key -> its encoding."""
    fusion = FrameFusion({"ensemble": plan})
    return fusion.labels(_decoded(plan.used, encoded, encodings, plan.num_classes))["ensemble"]


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
    frames: dict[str, list[str]]  # video -> frame names
    plans: dict[str, FusionPlan]
    order: tuple[str, ...]  # every member, in the decode order
    agreement: bool = False  # count how often each pair of members agrees


def _pack(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sparse confusion matrix (a video's holds few of the ``C^2`` cells)."""
    flat = matrix.ravel()
    idx = np.flatnonzero(flat)
    return idx.astype(np.int32), flat[idx]


def _unpack(packed: tuple[np.ndarray, np.ndarray], c: int) -> np.ndarray:
    out = np.zeros(c * c, np.int64)
    out[packed[0]] = packed[1]
    return out.reshape(c, c)


def _agree(labels: Sequence[np.ndarray], valid: np.ndarray, counts: np.ndarray) -> None:
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            same = np.count_nonzero((labels[i] == labels[j]) & valid)
            counts[i, j] += same
            counts[j, i] += same


def run_rescore_job(job: RescoreJob) -> dict:
    """``{"videos": {(plan, video): (packed confusion, VC accumulators)}, "agreement": [M, M]
    counts of valid pixels where two members agree, "pixels": valid pixels}`` of one shard."""

    store = ScoreStore(job.store)
    encodings = {m: store.encoding(m) for m in job.order}
    c = next(iter(job.plans.values())).num_classes
    reader = FusionPlan({"all": list(job.order)}, (), "prob", c, order=job.order)
    fusion = FrameFusion(job.plans)
    singles = {fusion.singles[n]: n for n in fusion.singles}
    out = {"videos": {}, "agreement": np.zeros((len(job.order),) * 2, np.int64), "pixels": 0}
    for video in job.videos:
        listed = {f.name: f for f in list_frames(job.root, video)}
        matrices = {n: np.zeros((c, c), np.int64) for n in job.plans}
        vcs = {n: VideoConsistency(VC_WINDOWS) for n in job.plans}
        for name, encoded in video_scores(store, reader, job.split, video, job.frames[video]):
            raw = read_raw_mask(listed[name])
            labels = fusion.labels(_decoded(job.order, encoded, encodings, c))
            for plan, pred in labels.items():
                if pred.shape != raw.shape:
                    raise DataError(f"stored scores of video '{video}' frame '{name}' are "
                                    f"{pred.shape} but the mask is {raw.shape}")
                matrices[plan] += confusion(pred, raw, c, raw=True)
                vcs[plan].update(raw, pred)
            if job.agreement:
                valid = (raw != 0) & (raw != 255)
                _agree([labels[singles[m]] for m in job.order], valid, out["agreement"])
                out["pixels"] += int(np.count_nonzero(valid))
        for plan in job.plans:
            vcs[plan].end_video()
            out["videos"][plan, video] = (_pack(matrices[plan]), vcs[plan].accs)
    return out


@dataclass
class Rescored:
    """Every plan's per-video confusion matrices and VC windows, and the members' agreement."""

    num_classes: int
    videos: dict[tuple[str, str], tuple]  # (plan, video) -> (packed matrix, VC accumulators)
    members: tuple[str, ...]
    agreement: np.ndarray  # [M, M] share of valid pixels where two members agree
    pixels: int

    def matrix(self, plan: str, video: str) -> np.ndarray:
        return _unpack(self.videos[plan, video][0], self.num_classes)

    def by_video(self, plan: str, videos: Sequence[str]) -> dict[str, np.ndarray]:
        return {v: self.matrix(plan, v) for v in videos}

    def fold(self, plan: str, videos: Sequence[str]):
        """``(confusion [C, C], VideoConsistency)`` of ``plan`` over ``videos``."""

        matrix = np.zeros((self.num_classes,) * 2, np.int64)
        vc = VideoConsistency(VC_WINDOWS)
        for v in videos:
            matrix += self.matrix(plan, v)
            vc.merge(VideoConsistency(VC_WINDOWS, self.videos[plan, v][1]))
        return matrix, vc


def rescore(store: str, root: str, split: str, frames: Mapping[str, list[str]],
            plans: Mapping[str, FusionPlan], order: Sequence[str], shards: int, map_fn, *,
            agreement: bool = False) -> Rescored:
    """Every plan over every video of ``frames`` (video -> frame names, in split order), from
    one pass sharded into ``shards`` jobs run by ``map_fn(run_rescore_job, jobs)``; ``order``:
    every member, in the decode order. With ``agreement``, every member must be a plan of its
    own (a single), whose labels are compared pairwise."""

    plans = {n: FusionPlan(p.groups, p.weights, p.space, p.num_classes, p.inner, tuple(order),
                           p.names) for n, p in plans.items()}
    jobs = [RescoreJob(store, root, split, shard, {v: frames[v] for v in shard}, plans,
                       tuple(order), agreement)
            for shard in shard_videos(list(frames), shards)]
    c = next(iter(plans.values())).num_classes
    videos, counts, pixels = {}, np.zeros((len(order),) * 2, np.int64), 0
    for part in map_fn(run_rescore_job, jobs):
        videos.update(part["videos"])
        counts += part["agreement"]
        pixels += part["pixels"]
    share = counts / pixels if pixels else np.full(counts.shape, np.nan)
    np.fill_diagonal(share, 1.0)
    return Rescored(c, videos, tuple(order), share, pixels)
