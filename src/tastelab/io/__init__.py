"""Label files, A/B votes, image discovery and dataset splits.

Names load on first use (PEP 562): importing one submodule (``tastelab.io.images`` for scoring) must not
import the others (``splits`` pulls in numpy), so the CLI's help and a torch-free scoring path stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tastelab.core.lazy import lazy_exports

_RECORDS = "tastelab.io.records"
_SPLITS = "tastelab.io.splits"
_VOTES = "tastelab.io.votes"
#: Public name -> defining module.
_LAZY: dict[str, str] = {
    "IMAGE_EXTENSIONS": _RECORDS,
    "Problem": _RECORDS,
    "Record": _RECORDS,
    "RecordError": _RECORDS,
    "RecordSet": _RECORDS,
    "expand_inputs": _RECORDS,
    "list_images": _RECORDS,
    "load_ava": _RECORDS,
    "load_mos_table": _RECORDS,
    "load_personal_scores": _RECORDS,
    "load_records": _RECORDS,
    "resolve_image_path": _RECORDS,
    "load_split": _SPLITS,
    "make_split": _SPLITS,
    "save_split": _SPLITS,
    "split_comparisons": _SPLITS,
    "split_records": _SPLITS,
    "Vote": _VOTES,
    "load_votes": _VOTES,
    "write_votes": _VOTES,
}

if TYPE_CHECKING:
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


__getattr__ = lazy_exports(__name__, _LAZY, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
