"""Label files, image discovery and dataset splits."""

from tastelab.io.records import (
    IMAGE_EXTENSIONS,
    Comparison,
    Problem,
    Record,
    RecordError,
    RecordSet,
    expand_inputs,
    list_images,
    load_ava,
    load_comparisons,
    load_mos_table,
    load_personal_scores,
    load_records,
    resolve_image_path,
)
from tastelab.io.splits import load_split, make_split, save_split, split_comparisons, split_records

__all__ = [
    "IMAGE_EXTENSIONS",
    "Comparison",
    "Problem",
    "Record",
    "RecordError",
    "RecordSet",
    "expand_inputs",
    "list_images",
    "load_ava",
    "load_comparisons",
    "load_mos_table",
    "load_personal_scores",
    "load_records",
    "load_split",
    "make_split",
    "resolve_image_path",
    "save_split",
    "split_comparisons",
    "split_records",
]
