"""The submission (``--apply test``): every member's scores on a split fused with the weights
chosen on fold A, unchanged, as prediction PNGs of reduced ids ``0..C-1`` (what ``vspw-ray
infer`` writes and ``vspw-ray evaluate`` reads: raw VSPW id minus one, no +1) under
``<submission>/<video>/<frame>.png``, a ``submission.zip`` whose root holds
``<video>/<frame>.png``, and ``manifest.json``.

Nothing is left half-written: each PNG and the zip are written under a temporary name and
moved; ``plan.json`` (what is being written) comes first and ``manifest.json`` (the completion
record) last. A re-run with the same plan keeps the PNGs already there and writes the rest; a
re-run with another plan (other weights, members or split) clears the folder and starts over.
"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vspw_ray.ensemble.core.rescore import FusionPlan, frame_labels, video_scores
from vspw_ray.storage import TMP_PREFIX, filesystem, read_json, write_atomic

__all__ = ["Submission", "SubmitJob", "run_submit_job", "write_submission"]

PLAN, MANIFEST, ZIP = "plan.json", "manifest.json", "submission.zip"


@dataclass(frozen=True)
class Submission:
    folder: str  # PNGs, plan.json, manifest.json
    zip: str
    manifest: dict
    written: int  # frames this run wrote (0: complete before)


@dataclass(frozen=True)
class SubmitJob:
    store: str
    split: str
    folder: str
    videos: list[str]
    frames: dict[str, list[str]]  # video -> frame names, in order
    plan: FusionPlan


def _png(labels) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(labels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _present(fs, folder: str) -> set[str]:
    """PNG names complete in ``folder``; leftover temporary files of a killed run removed."""
    import pyarrow.fs

    done = set()
    for info in fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True)):
        if info.base_name.startswith(TMP_PREFIX):
            fs.delete_file(info.path)
        elif info.type == pyarrow.fs.FileType.File:
            done.add(info.base_name)
    return done


def run_submit_job(job: SubmitJob) -> int:
    """Write the missing PNGs of one shard's videos; returns how many were written."""
    from vspw_ray.scores.store import ScoreStore

    store = ScoreStore(job.store)
    encodings = {m: store.encoding(m) for m in job.plan.used}
    fs, root = filesystem(job.folder)
    written = 0
    for video in job.videos:
        present = _present(fs, f"{root}/{video}")
        if all(f"{f}.png" in present for f in job.frames[video]):
            continue
        for name, encoded in video_scores(store, job.plan, job.split, video, job.frames[video]):
            if f"{name}.png" not in present:
                labels = frame_labels(job.plan, encoded, encodings)
                write_atomic(fs, f"{root}/{video}/{name}.png", _png(labels))
                written += 1
    return written


def _start(fs, root: str, plan: Mapping) -> dict | None:
    """The manifest when the folder is complete for ``plan``; else prepare it (cleared when it
    holds another plan's files) and return None."""
    manifest = read_json(fs, f"{root}/{MANIFEST}")
    if manifest is not None and manifest.get("plan") == plan:
        return manifest
    if read_json(fs, f"{root}/{PLAN}") != plan:
        fs.create_dir(root, recursive=True)
        fs.delete_dir_contents(root, missing_dir_ok=True)
        write_atomic(fs, f"{root}/{PLAN}", json.dumps(plan, indent=1).encode())
    elif manifest is not None:
        fs.delete_file(f"{root}/{MANIFEST}")
    return None


def _zip(fs, root: str, frames: Mapping[str, list[str]]) -> None:
    """``submission.zip`` with ``<video>/<frame>.png`` at its root, built locally and moved
    into place."""
    with tempfile.TemporaryDirectory() as d:
        local = Path(d) / ZIP
        with zipfile.ZipFile(local, "w", zipfile.ZIP_STORED) as z:
            for video, names in frames.items():
                for name in names:
                    with fs.open_input_stream(f"{root}/{video}/{name}.png") as f:
                        z.writestr(f"{video}/{name}.png", f.read())
        write_atomic(fs, f"{root}/{ZIP}", local.read_bytes())


def write_submission(store: str, split: str, folder: str, frames: Mapping[str, list[str]],
                     plan: FusionPlan, identity: Mapping, info: Mapping, *, shards: int,
                     map_fn: Callable) -> Submission:
    """Write (or finish) the submission of ``split`` into ``folder``.

    Args:
        frames: video -> frame names of the split, in order (every member must hold them).
        plan: the fusion (no baselines needed).
        identity: what makes two submissions the same (ensemble id, split, groups, weights).
        info: the rest of the manifest (members, method, fold figures).
        map_fn: ``map_fn(run_submit_job, jobs)``, e.g. Ray tasks.
    """
    from vspw_ray.ensemble.core.grid import shard_videos

    fs, root = filesystem(folder)
    plan_record = json.loads(json.dumps(identity))
    done = _start(fs, root, plan_record)
    if done is not None:
        return Submission(folder, f"{folder}/{ZIP}", done, 0)
    jobs = [SubmitJob(store, split, folder, shard, {v: list(frames[v]) for v in shard}, plan)
            for shard in shard_videos(list(frames), shards)]
    written = sum(map_fn(run_submit_job, jobs))
    _zip(fs, root, frames)
    manifest = {**info, "plan": plan_record, "videos": len(frames),
                "frames": sum(len(v) for v in frames.values()), "zip": ZIP,
                "labels": "reduced class ids 0..C-1 (raw VSPW id - 1), 8-bit PNG"}
    write_atomic(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=1, default=float).encode())
    return Submission(folder, f"{folder}/{ZIP}", manifest, written)
