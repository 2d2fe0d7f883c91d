"""Completion records of pipeline steps: a small JSON file per step, written last (through
pyarrow, local or remote), holding the step's key and what it produced."""

from __future__ import annotations

import json
import time

from vspw_ray.layout import RunLayout
from vspw_ray.storage import filesystem, write_atomic

__all__ = ["read_record", "write_record"]


def read_record(layout: RunLayout, pipeline: str, step: str) -> dict | None:
    """The record of ``step`` (``stage:item``), or None when the step has not completed."""
    fs, path = filesystem(layout.pipeline_record(pipeline, step))
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):  # absent, or cut off while written: not complete
        return None


def write_record(layout: RunLayout, pipeline: str, step: str, key: str,
                 outputs: dict | None = None) -> None:
    """Mark ``step`` complete for ``key`` (written whole under a temporary name, then moved)."""
    fs, path = filesystem(layout.pipeline_record(pipeline, step))
    record = {"step": step, "key": key, "outputs": outputs or {}, "finished_at": time.time()}
    write_atomic(fs, path, json.dumps(record, indent=1, default=str).encode())
