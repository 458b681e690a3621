"""Label files, A/B votes, image discovery and dataset splits."""

from tastelab.io.records import (
    IMAGE_EXTENSIONS,
    Problem,
    Record,
    RecordError,
    RecordSet,
    expand_inputs,
    list_images,
    load_ava,
    load_mos_table,
    load_personal_scores,
    load_records,
    resolve_image_path,
)
from tastelab.io.splits import load_split, make_split, save_split, split_comparisons, split_records
from tastelab.io.votes import Vote, load_votes, write_votes

__all__ = [
    "IMAGE_EXTENSIONS",
    "Problem",
    "Record",
    "RecordError",
    "RecordSet",
    "Vote",
    "expand_inputs",
    "list_images",
    "load_ava",
    "load_mos_table",
    "load_personal_scores",
    "load_records",
    "load_split",
    "load_votes",
    "make_split",
    "resolve_image_path",
    "save_split",
    "split_comparisons",
    "split_records",
    "write_votes",
]
