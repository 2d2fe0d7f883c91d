"""Data layer: the VSPW layout, training/evaluation datasets, checks, stats and synthetic videos."""

from vspw_ray.data.layout import (
    IGNORE_INDEX,
    ClassTable,
    DataError,
    Frame,
    fold_videos,
    label_lut,
    list_frames,
    load_class_table,
    read_image,
    read_mask,
    read_raw_mask,
    read_split,
    reduce_mask,
    split_folds,
    split_frames,
)

__all__ = [
    "IGNORE_INDEX",
    "ClassTable",
    "DataError",
    "Frame",
    "fold_videos",
    "label_lut",
    "list_frames",
    "load_class_table",
    "read_image",
    "read_mask",
    "read_raw_mask",
    "read_split",
    "reduce_mask",
    "split_folds",
    "split_frames",
]
