"""Writing, finding and reading checkpoints on local disk or shared storage (``s3://``,
``gs://`` through pyarrow's filesystems), without Ray.

A checkpoint is a folder holding ``checkpoint.pt`` (the state), ``metrics.json`` (its
:func:`summary`, read to choose checkpoints without loading weights) and ``complete.json``, the
completion record: the byte size and sha256 of the other two, written last. Ray Train copies a
reported folder file by file (in no set order, several files at once) straight into the run's
``checkpoint_*`` folder, so a killed run or a lost node can leave a folder whose files are cut
off part-way. A folder counts only when its record is there and every file it names has the
recorded size: that needs no weights read, and catches a cut-off file whichever file was copied
first. ``is_complete(folder, verify=True)`` also compares the sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping

import numpy as np

from vspw_ray.storage import filesystem, is_uri, read_json

__all__ = ["CHECKPOINT_FILE", "METRICS_FILE", "COMPLETE_FILE", "summary", "write_checkpoint",
           "is_complete", "read_state", "read_summary", "list_checkpoints", "best_checkpoint",
           "checkpoint_file", "remove_incomplete", "VAL_CONFUSIONS_FILE", "read_val_confusions"]

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"  # beside checkpoint.pt: its summary (below)
VAL_CONFUSIONS_FILE = "val_confusions.npz"  # video -> [C, C] confusion matrix (int64)
COMPLETE_FILE = "complete.json"  # written last: {"files": {name: {"size", "sha256"}}}
_PREFIX = "checkpoint_"  # Ray Train's checkpoint folder names


def summary(state: dict) -> dict:
    """What ``metrics.json`` records of a checkpoint's state: enough to find, choose and
    describe checkpoints without loading weights (the family, training split, fold seed and
    data fingerprint travel on into the score store's manifest; None in checkpoints written
    before fingerprints)."""
    config = state.get("config") or {}
    data = config.get("data", {})
    return {"variant_id": state.get("variant_id"), "iteration": state.get("iteration"),
            "kind": state.get("kind", "train"), "metrics": state.get("metrics", {}),
            "parent_variant_id": state.get("parent_variant_id"),
            "family": config.get("model", {}).get("family"),
            "train_split": data.get("train_split"), "fold_seed": data.get("fold_seed"),
            "data_fingerprint": state.get("data_fingerprint"),
            "init_data_fingerprint": state.get("init_data_fingerprint")}


class _HashingWriter:
    """Passes bytes on to ``out`` and keeps their count and sha256 (hashing while writing
    saves reading a multi-GB checkpoint back)."""

    def __init__(self, out):
        self.out, self.size, self.sha256 = out, 0, hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.out.write(view)
        self.size += view.nbytes
        self.sha256.update(view)
        return view.nbytes

    def flush(self) -> None:
        self.out.flush()

    def record(self) -> dict:
        return {"size": self.size, "sha256": self.sha256.hexdigest()}


def write_checkpoint(directory: str, state: dict,
                     val_confusions: Mapping[str, np.ndarray] | None = None) -> str:
    """Write ``state`` as a checkpoint folder (local path or URI): ``checkpoint.pt``, then
    ``metrics.json`` and ``val_confusions.npz`` (when given: video -> its confusion matrix),
    then the completion record ``complete.json``.

    Returns:
        The path (or URI) of the written ``checkpoint.pt``.
    """
    import pyarrow.fs

    fs, inner = filesystem(str(directory))
    fs.create_dir(inner, recursive=True)
    record = f"{inner}/{COMPLETE_FILE}"
    if fs.get_file_info(record).type != pyarrow.fs.FileType.NotFound:
        fs.delete_file(record)  # a rewrite is incomplete until its own record is written
    import torch  # heavy: loaded when a checkpoint is written or read, not to list them

    files = {}
    with fs.open_output_stream(f"{inner}/{CHECKPOINT_FILE}") as out:
        writer = _HashingWriter(out)
        torch.save(state, writer)
        files[CHECKPOINT_FILE] = writer.record()
    with fs.open_output_stream(f"{inner}/{METRICS_FILE}") as out:
        writer = _HashingWriter(out)
        writer.write(json.dumps(summary(state), indent=1).encode())
        files[METRICS_FILE] = writer.record()
    if val_confusions is not None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{video: np.asarray(m, np.int64)
                                       for video, m in val_confusions.items()})
        with fs.open_output_stream(f"{inner}/{VAL_CONFUSIONS_FILE}") as out:
            writer = _HashingWriter(out)
            writer.write(buffer.getbuffer())
            files[VAL_CONFUSIONS_FILE] = writer.record()
    with fs.open_output_stream(record) as out:
        out.write(json.dumps({"files": files}, indent=1).encode())
    return checkpoint_file(str(directory))


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _incomplete_reason(fs, folder: str, verify: bool = False) -> str | None:
    """Why the checkpoint folder ``folder`` (a path in ``fs``) is incomplete; None when its
    completion record is there and every file it names matches it."""
    import pyarrow.fs

    record = read_json(fs, f"{folder}/{COMPLETE_FILE}")
    files = record.get("files") if isinstance(record, dict) else None
    if (not isinstance(files, dict) or {CHECKPOINT_FILE, METRICS_FILE} - files.keys()
            or not all(isinstance(f, dict) for f in files.values())):
        return f"it has no readable completion record {COMPLETE_FILE}"
    for name, info in zip(files, fs.get_file_info([f"{folder}/{name}" for name in files])):
        if info.type != pyarrow.fs.FileType.File:
            return f"{name} is missing"
        if info.size != files[name].get("size"):
            return f"{name} has {info.size} of its {files[name].get('size')} bytes"
    for name, entry in files.items() if verify else ():
        if _sha256(fs, f"{folder}/{name}") != entry.get("sha256"):
            return f"the sha256 of {name} differs from the one in {COMPLETE_FILE}"
    return None


def is_complete(folder: str, *, verify: bool = False) -> bool:
    """Whether a checkpoint folder (local path or URI) was written to the end: its completion
    record is there and each file has the recorded size (no weights read). ``verify=True``
    also compares each file's sha256 (reads the whole checkpoint)."""
    fs, inner = filesystem(folder)
    return _incomplete_reason(fs, inner, verify) is None


def _require_complete(fs, inner: str, folder: str) -> None:
    """Raise, for users, unless the checkpoint folder ``folder`` (``inner`` in ``fs``) is
    complete."""
    import pyarrow.fs

    if fs.get_file_info(f"{inner}/{CHECKPOINT_FILE}").type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"checkpoint {folder}/{CHECKPOINT_FILE} does not exist")
    reason = _incomplete_reason(fs, inner)
    if reason:
        raise ValueError(
            f"checkpoint folder {folder} is incomplete ({reason}): its writing was cut off "
            f"(a killed run or a lost node) and it cannot be used. Pass a complete checkpoint "
            f"(vspw_ray.checkpoints.list_checkpoints(RUN_FOLDER) lists them) or delete the folder")


def read_state(path: str) -> dict:
    """The state of a checkpoint folder or its ``checkpoint.pt`` (local path or URI), on the
    CPU. Another ``.pt``/``.pth`` file (a bare state dict) is read as it is.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the checkpoint folder is incomplete (see :func:`is_complete`).
    """
    import pyarrow.fs
    import torch

    file = checkpoint_file(str(path))
    fs, inner = filesystem(file)
    folder, name = file.rsplit("/", 1)
    if name == CHECKPOINT_FILE:
        _require_complete(fs, inner.rsplit("/", 1)[0], folder)
    elif fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"checkpoint {file} does not exist")
    if not is_uri(file):
        return torch.load(inner, map_location="cpu", weights_only=False, mmap=True)
    with fs.open_input_stream(inner) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


def read_summary(checkpoint: str) -> dict:
    """variant_id, iteration, kind, metrics and parent of a checkpoint folder or its
    ``checkpoint.pt``: from ``metrics.json`` (no weights read, nothing downloaded). Another
    ``.pt`` file is loaded to summarize it.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: the checkpoint folder is incomplete (see :func:`is_complete`).
    """
    file = checkpoint_file(str(checkpoint))
    folder, name = file.rsplit("/", 1)
    if name != CHECKPOINT_FILE:
        return summary(read_state(file))
    fs, inner = filesystem(folder)
    _require_complete(fs, inner, folder)
    found = read_json(fs, f"{inner}/{METRICS_FILE}")
    if not isinstance(found, dict):
        raise ValueError(f"{folder}/{METRICS_FILE} is not a checkpoint summary; the folder was "
                         f"not written by vspw_ray.checkpoints.write_checkpoint")
    return found


def read_val_confusions(checkpoint: str) -> dict[str, np.ndarray]:
    """Each val video's confusion matrix ``[C, C]`` at a checkpoint's validation (its
    ``val_confusions.npz``): the matrices its ``val_A`` / ``val_B`` metrics sum, for bootstrap
    intervals over videos without inferring again.

    Raises:
        FileNotFoundError: the checkpoint holds none (written before they were kept, or at an
            iteration without validation).
    """
    import pyarrow.fs

    folder = checkpoint_file(str(checkpoint)).rsplit("/", 1)[0]
    fs, inner = filesystem(folder)
    _require_complete(fs, inner, folder)
    path = f"{inner}/{VAL_CONFUSIONS_FILE}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(
            f"{folder} holds no {VAL_CONFUSIONS_FILE}: it was written without a validation (or "
            f"by an older vspw_ray); score it with `vspw-ray infer` and `vspw-ray evaluate "
            f"--store` instead")
    with fs.open_input_stream(path) as f:
        data = f.read()
    with np.load(io.BytesIO(data)) as z:
        return {video: z[video] for video in z.files}


def _checkpoint_folders(fs, run_dir: str) -> list:
    """FileInfo of each ``checkpoint_*`` folder directly under ``run_dir`` (a path in ``fs``),
    by name; none when ``run_dir`` does not exist."""
    import pyarrow.fs

    infos = fs.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True))
    return sorted((i for i in infos if i.type == pyarrow.fs.FileType.Directory
                   and i.base_name.startswith(_PREFIX)), key=lambda i: i.base_name)


def _shown(run_dir: str, info) -> str:
    """A folder found under ``run_dir`` as users name it: absolute local path or URI."""
    return f"{run_dir.rstrip('/')}/{info.base_name}" if is_uri(run_dir) else info.path


def list_checkpoints(run_dir: str) -> list[tuple[str, dict]]:
    """``(checkpoint folder, metrics.json summary)`` of every complete checkpoint under a Ray
    Train run folder (local or URI), sorted by folder (Ray Train names them by time).
    Incomplete folders (see :func:`is_complete`) are left out."""
    fs, inner = filesystem(run_dir)
    found = []
    for info in _checkpoint_folders(fs, inner):
        if _incomplete_reason(fs, info.path) is None:
            found_summary = read_json(fs, f"{info.path}/{METRICS_FILE}")
            if isinstance(found_summary, dict):
                found.append((_shown(run_dir, info), found_summary))
    return found


def best_checkpoint(run_dir: str, metric: str = "val_A/miou") -> str:
    """The complete training checkpoint folder under a Ray Train run folder with the highest
    ``metric`` (the latest among equals)."""
    scored = [(s["metrics"].get(metric, float("-inf")), s["iteration"], p)
              for p, s in list_checkpoints(run_dir) if s.get("kind", "train") == "train"]
    if not scored:
        raise FileNotFoundError(
            f"no complete training checkpoint under {run_dir}: train it first "
            f"(vspw-ray train EXPERIMENT.yaml --variant ...) or pass --from CHECKPOINT")
    return max(scored)[2]


def remove_incomplete(run_dir: str, keep: set[str], *, fs=None) -> list[str]:
    """Delete the incomplete ``checkpoint_*`` folders under a run folder, except those in
    ``keep``.

    Args:
        run_dir: the run folder: a local path or URI, or a path inside ``fs``.
        keep: folders not to delete whatever their state (those Ray Train has registered),
            as paths, URIs or bare names: compared by folder name, since Ray Train gives
            paths without the URI scheme.
        fs: the pyarrow filesystem ``run_dir`` is in (as Ray Train's storage gives it);
            default: the one :func:`vspw_ray.storage.filesystem` opens for ``run_dir``.

    Returns:
        The deleted folders, as :func:`list_checkpoints` names folders.
    """
    fs, inner = (fs, run_dir) if fs is not None else filesystem(run_dir)
    kept = {k.rstrip("/").rsplit("/", 1)[-1] for k in keep}
    removed = []
    for info in _checkpoint_folders(fs, inner):
        if info.base_name not in kept and _incomplete_reason(fs, info.path) is not None:
            fs.delete_dir(info.path)
            removed.append(_shown(run_dir, info))
    return removed


def checkpoint_file(path: str) -> str:
    """The ``checkpoint.pt`` of a checkpoint folder (a path to the file is kept as it is)."""
    if path.endswith((".pt", ".pth")):
        return path
    return f"{path.rstrip('/')}/{CHECKPOINT_FILE}"
