"""Whole-file writes and JSON reads through pyarrow filesystems (a local folder or a URI): a
file is written under a temporary name and moved, so a reader never sees half of it."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["TMP_PREFIX", "write_atomic", "read_json"]

TMP_PREFIX = ".tmp-"


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` (a path inside ``fs``) whole: temporary name, then move."""
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/{TMP_PREFIX}{name}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_json(fs, path: str) -> Any:
    """The JSON file at ``path`` inside ``fs``, or None when there is none."""
    import pyarrow.fs

    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())
