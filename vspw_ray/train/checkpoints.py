"""Finding and reading checkpoints on local disk or shared storage (``s3://``, ``gs://``
through pyarrow's filesystems), without Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from vspw_ray.storage import filesystem, is_uri

__all__ = ["CHECKPOINT_FILE", "METRICS_FILE", "summary", "read_state", "read_summary",
           "list_checkpoints", "best_checkpoint", "checkpoint_file"]

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"  # beside checkpoint.pt: its summary (below)


def summary(state: dict) -> dict:
    """What ``metrics.json`` records of a checkpoint's state: enough to find and choose
    checkpoints without loading weights."""
    return {"variant_id": state.get("variant_id"), "iteration": state.get("iteration"),
            "kind": state.get("kind", "train"), "metrics": state.get("metrics", {}),
            "parent_variant_id": state.get("parent_variant_id")}


def read_state(path: str) -> dict:
    """A ``checkpoint.pt`` (or bare state dict) from a local path or an ``s3://``/``gs://``
    URI, on the CPU."""
    if is_uri(path):
        fs, inner = filesystem(path)
        with fs.open_input_stream(inner) as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def read_summary(checkpoint: str) -> dict:
    """variant_id, iteration, kind, metrics and parent of a ``checkpoint.pt``: from the
    ``metrics.json`` beside it when there is one (no weights read, nothing downloaded), else
    from the checkpoint itself."""
    fs, inner = filesystem(checkpoint.rsplit("/", 1)[0])
    try:
        with fs.open_input_stream(f"{inner}/{METRICS_FILE}") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return summary(read_state(checkpoint))


def list_checkpoints(run_dir: str) -> list[tuple[str, dict]]:
    """``(checkpoint folder, metrics.json summary)`` of every complete checkpoint under a Ray
    Train run folder (local or URI). A folder without its summary (a half-written copy from a
    killed run) is left out."""
    import pyarrow.fs

    fs, inner = filesystem(run_dir)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    except OSError:
        return []
    found = []
    for info in infos:
        if (info.type != pyarrow.fs.FileType.Directory
                or not info.base_name.startswith("checkpoint_")):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{METRICS_FILE}") as f:
                summary = json.loads(f.read())
        except (OSError, ValueError):
            continue
        folder = info.path if "://" not in run_dir else run_dir.split("://")[0] + "://" + info.path
        found.append((folder, summary))
    return sorted(found, key=lambda x: x[0])


def best_checkpoint(storage: str, vid: str, metric: str = "val_A/miou") -> str:
    """The checkpoint folder of a trained variant with the highest ``metric``."""
    run_dir = f"{storage.rstrip('/')}/train/{vid}"
    scored = [(s["metrics"].get(metric, float("-inf")), s["iteration"], p)
              for p, s in list_checkpoints(run_dir) if s.get("kind", "train") == "train"]
    if not scored:
        raise FileNotFoundError(
            f"no checkpoint of variant {vid} under {run_dir}: train it first "
            f"(vspw-ray train EXPERIMENT.yaml --variant ...) or pass --from CHECKPOINT")
    return max(scored)[2]


def checkpoint_file(path: str) -> str:
    """The ``checkpoint.pt`` of a checkpoint folder (a path to the file is kept as it is)."""
    if path.endswith((".pt", ".pth")):
        return path
    return f"{path.rstrip('/')}/{CHECKPOINT_FILE}"
