"""Completion records of pipeline steps: a small JSON file per step (its stage's ``Record``,
flattened), written last through pyarrow (local or remote), holding the step's key and what it
produced. While a step runs, a marker beside it (``.running.json``) names the host and process
and is refreshed every ``HEARTBEAT_S``: a marker older than ``LIVE_S`` was left by a pipeline
that stopped."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping

from vspw_ray.layout import RunLayout
from vspw_ray.storage import filesystem, read_json, write_atomic

__all__ = ["read_record", "write_record", "write_marker", "clear_marker", "read_marker",
           "headline", "HEADLINE_LABELS", "HEARTBEAT_S", "LIVE_S"]

HEARTBEAT_S = 30.0
LIVE_S = 4 * HEARTBEAT_S

# the figure a step is known by, the first its record holds: a model's fold-A mIoU (the fold
# that chose its checkpoint); the ensemble's honest one, out of fold over all of val
# (cross-fitted selection) or on fold B (hold-out), never its selecting fold's
_HEADLINES = {"ensemble": ("oof/ensemble/miou", "final/val_B/miou")}
_MODEL_HEADLINES = ("final/val_A/miou", "final/val_B/miou")
HEADLINE_LABELS = {"final/val_A/miou": "val_A", "final/val_B/miou": "val_B",
                   "oof/ensemble/miou": "out-of-fold"}


def headline(stage: str, outputs: Mapping) -> tuple[str, float] | None:
    """``(name, value)`` of the figure a step of ``stage`` is known by, from its outputs."""
    for key in _HEADLINES.get(stage, _MODEL_HEADLINES):
        if isinstance(outputs.get(key), (int, float)):
            return key, float(outputs[key])
    return None


def _marker(layout: RunLayout, pipeline: str, step: str) -> str:
    return layout.pipeline_record(pipeline, step).removesuffix(".json") + ".running.json"


def write_marker(layout: RunLayout, pipeline: str, step: str, key: str, started: float) -> None:
    """Mark ``step`` running (again: a heartbeat)."""
    fs, path = filesystem(_marker(layout, pipeline, step))
    marker = {"step": step, "key": key, "host": socket.gethostname(), "pid": os.getpid(),
              "started_at": started, "heartbeat": time.time()}
    write_atomic(fs, path, json.dumps(marker).encode())


def clear_marker(layout: RunLayout, pipeline: str, step: str) -> None:
    fs, path = filesystem(_marker(layout, pipeline, step))
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def read_marker(layout: RunLayout, pipeline: str, step: str) -> dict | None:
    """The running marker of ``step`` (``live`` added: refreshed within ``LIVE_S``, and on
    this host by a process that still exists)."""
    marker = read_json(*filesystem(_marker(layout, pipeline, step)))
    if marker is None:
        return None
    live = time.time() - float(marker.get("heartbeat", 0)) < LIVE_S
    if live and marker.get("host") == socket.gethostname():
        live = _exists(int(marker.get("pid", 0)))
    return {**marker, "live": live}


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return pid > 0


def read_record(layout: RunLayout, pipeline: str, step: str) -> dict | None:
    """The record of ``step`` (``stage:item``), or None when the step has not completed."""
    return read_json(*filesystem(layout.pipeline_record(pipeline, step)))  # cut off: not complete


def write_record(layout: RunLayout, pipeline: str, step: str, key: str,
                 outputs: dict | None = None) -> None:
    """Mark ``step`` complete for ``key`` (written whole under a temporary name, then moved)."""
    fs, path = filesystem(layout.pipeline_record(pipeline, step))
    record = {"step": step, "key": key, "outputs": outputs or {}, "finished_at": time.time()}
    write_atomic(fs, path, json.dumps(record, indent=1, default=str).encode())
