"""The Parquet score store: every member's encoded class scores for every frame of a split.

Layout (a local folder, a shared mount, or an ``s3://``/``gs://`` URI through pyarrow)::

    STORE/<variant_id>/manifest.json          class table, TTA, encoding, checkpoint, MLflow run
    STORE/<variant_id>/<split>/<video>.parquet one row per frame, in frame order

Schema of each file (plain Arrow types, readable with pyarrow, pandas or duckdb)::

    video string, frame string, height int32, width int32        the frame and its size
    score_height int32, score_width int32                         the stored resolution
    classes binary   uint8 [top_k, score_height, score_width], C order: class ids, best first
    codes   binary   uint8, same shape: round(-log p / step) of those classes

(see :mod:`vspw_ray.scores.encoding`). Files are written under a temporary name and renamed when
complete; a file counts as done only when it reads back with the expected number of rows, so a
half-written file of a killed run is redone and no frame appears twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq

from vspw_ray.errors import StoreError
from vspw_ray.scores.encoding import EncodedScores, ScoreEncoding
from vspw_ray.storage import TMP_PREFIX, filesystem, write_atomic

__all__ = ["ScoreStore", "SCHEMA", "SCHEMA_DOC", "ENCODING_NAME", "ENCODING_DOC", "AlignedBatch",
           "StoreError", "frame_row"]

SCHEMA = pa.schema([
    ("video", pa.string()), ("frame", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()),
    ("score_height", pa.int32()), ("score_width", pa.int32()),
    ("classes", pa.binary()), ("codes", pa.binary()),
])
SCHEMA_DOC = "video, frame, height, width, score_height, score_width, classes, codes"
ENCODING_NAME = "topk-logq-u8"
ENCODING_DOC = ("classes/codes: uint8 [top_k, score_height, score_width]; p = exp(-code * step); "
                "the remaining mass is spread evenly over the other classes; resize bilinearly "
                "to height x width")


def frame_row(video: str, frame: str, height: int, width: int, classes: bytes, codes: bytes,
              score_height: int, score_width: int) -> dict:
    """One row of the schema: a frame's encoded scores (``classes`` and ``codes`` are the
    C-order bytes of uint8 ``[top_k, score_height, score_width]`` arrays)."""
    return {"video": video, "frame": frame, "height": height, "width": width,
            "score_height": score_height, "score_width": score_width,
            "classes": classes, "codes": codes}


def _encoded(row: dict) -> EncodedScores:
    """A row read back as :class:`EncodedScores` (the inverse of :func:`frame_row`)."""
    shape = (-1, row["score_height"], row["score_width"])
    return EncodedScores(np.frombuffer(row["classes"], np.uint8).reshape(shape),
                         np.frombuffer(row["codes"], np.uint8).reshape(shape),
                         row["height"], row["width"])


@dataclass(frozen=True)
class AlignedBatch:
    keys: list[tuple[str, str]]  # (video, frame), the same for every member
    scores: dict[str, list[EncodedScores]]  # variant_id -> one per key


class ScoreStore:
    def __init__(self, root: str | Path):
        self.uri = str(root)
        self.fs, self.root = filesystem(self.uri)

    # ------------------------------------------------------------------ paths and manifests
    def _member(self, vid: str) -> str:
        return f"{self.root}/{vid}"

    def video_path(self, vid: str, split: str, video: str) -> str:
        return f"{self._member(vid)}/{split}/{video}.parquet"

    def members(self) -> list[str]:
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                      and self._exists(f"{i.path}/manifest.json"))

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pyarrow.fs.FileType.File

    def manifest(self, vid: str) -> dict:
        path = f"{self._member(vid)}/manifest.json"
        if not self._exists(path):
            known = ", ".join(self.members()) or "none"
            raise StoreError(f"score store {self.uri} has no member '{vid}' (members: {known}); "
                             f"run vspw-ray infer for it first")
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read())

    def write_manifest(self, vid: str, manifest: dict) -> None:
        self._atomic_write(f"{self._member(vid)}/manifest.json",
                           json.dumps(manifest, indent=1).encode())

    def encoding(self, vid: str) -> ScoreEncoding:
        return ScoreEncoding(**self.manifest(vid)["encoding"]["params"])

    # ------------------------------------------------------------------ writing
    def _atomic_write(self, path: str, data: bytes) -> None:
        write_atomic(self.fs, path, data)

    def write_video(self, vid: str, split: str, video: str, rows: Sequence[dict]) -> int:
        """Write one video's frames (dicts with the schema's fields), atomically; returns
        the file's size in bytes."""
        table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["frame"]), schema=SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", compression_level=3)
        data = sink.getvalue().to_pybytes()
        self._atomic_write(self.video_path(vid, split, video), data)
        return len(data)

    def done_videos(self, vid: str, split: str, expected: dict[str, int]) -> set[str]:
        """Videos whose file reads back with the expected row count. Leftover temporary files
        of a killed run are removed; a short or unreadable file is removed and redone."""
        folder = f"{self._member(vid)}/{split}"
        done = set()
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
        for info in infos:
            if info.base_name.startswith(TMP_PREFIX):
                self.fs.delete_file(info.path)
                continue
            video = info.base_name.removesuffix(".parquet")
            if video not in expected:
                continue
            try:
                rows = pq.ParquetFile(info.path, filesystem=self.fs).metadata.num_rows
            except (OSError, pa.ArrowInvalid):
                rows = -1
            if rows == expected[video]:
                done.add(video)
            else:
                self.fs.delete_file(info.path)
        return done

    # ------------------------------------------------------------------ reading
    def videos(self, vid: str, split: str) -> list[str]:
        folder = f"{self._member(vid)}/{split}"
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
        return sorted(i.base_name.removesuffix(".parquet") for i in infos
                      if i.base_name.endswith(".parquet")
                      and not i.base_name.startswith(TMP_PREFIX))

    def read_video(self, vid: str, split: str, video: str) -> list[tuple[str, EncodedScores]]:
        """``(frame, EncodedScores)`` of one video, in frame order."""
        path = self.video_path(vid, split, video)
        if not self._exists(path):
            raise StoreError(f"member '{vid}' has no scores for {split} video '{video}' in "
                             f"{self.uri}; re-run vspw-ray infer for it")
        table = pq.read_table(path, filesystem=self.fs)
        return [(row["frame"], _encoded(row)) for row in table.to_pylist()]

    def read_aligned(self, vids: Sequence[str], split: str, *, batch_frames: int = 16,
                     videos: Sequence[str] | None = None) -> Iterator[AlignedBatch]:
        """Several members' scores for the same frames, batch by batch, in (video, frame)
        order. Every member must hold exactly the same frames."""
        if not vids:
            raise StoreError("read_aligned needs at least one member")
        listed = {vid: self.videos(vid, split) for vid in vids}
        first = listed[vids[0]]
        for vid in vids[1:]:
            if listed[vid] != first:
                diff = sorted(set(first) ^ set(listed[vid]))
                raise StoreError(f"members '{vids[0]}' and '{vid}' hold different {split} videos "
                                 f"(e.g. {diff[:5]}); run vspw-ray infer for the missing ones")
        keys: list[tuple[str, str]] = []
        scores: dict[str, list[EncodedScores]] = {vid: [] for vid in vids}
        for video in (videos if videos is not None else first):
            per_member = {vid: self.read_video(vid, split, video) for vid in vids}
            frames = [f for f, _ in per_member[vids[0]]]
            for vid in vids[1:]:
                if [f for f, _ in per_member[vid]] != frames:
                    raise StoreError(f"members '{vids[0]}' and '{vid}' hold different frames of "
                                     f"{split} video '{video}'")
            for i, frame in enumerate(frames):
                keys.append((video, frame))
                for vid in vids:
                    scores[vid].append(per_member[vid][i][1])
                if len(keys) == batch_frames:
                    yield AlignedBatch(keys, scores)
                    keys, scores = [], {vid: [] for vid in vids}
        if keys:
            yield AlignedBatch(keys, scores)

    def size_bytes(self, vid: str, split: str) -> int:
        folder = f"{self._member(vid)}/{split}"
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(folder, allow_not_found=True))
        return sum(i.size or 0 for i in infos if i.base_name.endswith(".parquet"))
