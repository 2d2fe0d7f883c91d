"""Where runs keep their files: a local folder by default, shared storage on a cluster.

``storage.path`` may be a local path, a shared mount, or an ``s3://`` / ``gs://`` URI (read and
written through pyarrow's filesystems by Ray Train). On a cluster (an address was given) a
node-local path or a SQLite MLflow URI would leave checkpoints and runs on one machine: that is
refused up front, naming the setting to change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vspw_ray.config import ConfigError, ExperimentConfig

__all__ = ["is_uri", "resolve_storage", "filesystem", "write_atomic", "read_json",
           "check_cluster_settings", "SHARED_MOUNT_ENV", "TMP_PREFIX"]

SHARED_MOUNT_ENV = "VSPW_RAY_SHARED_MOUNT"  # comma-separated mount points known to be shared


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem(path: str):
    """``(pyarrow filesystem, path inside it)`` of a local path or an ``s3://``/``gs://`` URI."""
    import pyarrow.fs

    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


TMP_PREFIX = ".tmp-"  # a file being written; readers skip it, a re-run removes it


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (a path inside the pyarrow filesystem ``fs``) whole: under a
    temporary name in the same folder, then moved (an object store writes an object whole
    anyway; a local folder gets an atomic rename)."""
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/{TMP_PREFIX}{name}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_json(fs, path: str) -> Any:
    """The JSON file at ``path`` inside the pyarrow filesystem ``fs``; None when there is none
    or it cannot be parsed (a file cut off while written is not there yet: its writer, or a
    re-run, writes it whole)."""
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def resolve_storage(path: str) -> str:
    """An absolute local path (created) or the URI unchanged."""
    if is_uri(path):
        return path
    local = Path(path).expanduser().resolve()
    local.mkdir(parents=True, exist_ok=True)
    return str(local)


def check_cluster_settings(cfg: ExperimentConfig, address: str | None, *,
                           track: bool = True) -> None:
    """With a cluster address, storage (and tracking, when on) must be reachable from every
    node."""
    if not address or address in ("local",):
        return
    path = cfg.storage.path
    shared = [m for m in os.environ.get(SHARED_MOUNT_ENV, "").split(",") if m]
    if not is_uri(path):
        resolved = str(Path(path).expanduser().resolve())
        if not any(resolved.startswith(str(Path(m).resolve())) for m in shared):
            raise ConfigError(
                f"config key 'storage.path': '{path}' is a node-local path but this run goes to "
                f"the cluster at {address}; set storage.path=s3://bucket/prefix (or gs://...), "
                f"or a shared mount listed in {SHARED_MOUNT_ENV}")
    uri = cfg.tracking.uri
    if track and (uri is None or uri.startswith("sqlite:")):
        raise ConfigError(
            f"config key 'tracking.uri': {'unset (SQLite default)' if uri is None else uri} "
            f"cannot be shared by the cluster at {address}; set tracking.uri=http://HOST:5000 "
            f"(an MLflow tracking server)")
