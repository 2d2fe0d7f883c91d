"""Whole-file writes and JSON reads through pyarrow filesystems (a local folder or a URI): a
file is written under a temporary name and moved, so a reader never sees half of it."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["TMP_PREFIX", "write_atomic", "read_json"]

from vspw_ray.storage import TMP_PREFIX, write_atomic  # noqa: F401 - used by the stage


def read_json(fs, path: str) -> Any:
    """The JSON file at ``path`` inside ``fs``, or None when there is none."""
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())
