"""COCO keypoints JSON: the label format of the pose task (person keypoints, facial landmarks, ...).

A file holds ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations`` (``id``, ``image_id``,
``category_id``, ``bbox`` ``[x, y, w, h]``, ``keypoints`` ``[x, y, v] * K``, ``iscrowd``) and ``categories``
(``keypoints``: the K names, ``skeleton``: 1-based index pairs, as COCO writes them). Optional, beyond COCO:
a category's ``flip_pairs`` (0-based index pairs, or pairs of keypoint names) that swap under a horizontal
flip; without it pairs are derived from ``left_*`` / ``right_*`` names (COCO's own naming).

Every instance becomes one :class:`KeypointInstance` (top-down pose: a model sees the instance's box).
Annotations that cannot teach anything are skipped and counted (``iscrowd``, no labelled keypoint);
malformed ones are :class:`~tastelab.core.errors.UserError` s naming the file and the annotation id, so a
user fixes the row instead of training on garbage. Non-finite numbers (Python's JSON reader accepts
``NaN`` / ``Infinity``) are errors, never coordinates.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tastelab.core.errors import UserError
from tastelab.io.textfiles import read_text_file

logger = logging.getLogger(__name__)

__all__ = ["KeypointInstance", "KeypointSet", "flip_pairs_from_names", "load_coco_keypoints", "resolve_flip_pairs"]


@dataclass(frozen=True)
class KeypointInstance:
    """One annotated instance: ``keypoints`` is ``(K, 3)`` ``[x, y, v]`` in the original image's pixels
    (``v``: 0 unlabelled, 1 labelled but occluded, 2 visible); ``bbox`` is ``[x, y, w, h]``."""

    path: str
    image_id: int
    ann_id: int
    bbox: tuple[float, float, float, float]
    keypoints: np.ndarray
    size: tuple[int, int]  # (width, height) the JSON declares (0, 0 when absent)


@dataclass
class KeypointSet:
    """What :func:`load_coco_keypoints` read: instances plus the category's names, skeleton and flip pairs."""

    source: str
    instances: list[KeypointInstance]
    names: list[str]
    skeleton: list[tuple[int, int]]  # 0-based
    flip_pairs: list[tuple[int, int]]  # 0-based
    category: str
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_keypoints(self) -> int:
        return len(self.names)


def flip_pairs_from_names(names: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` whose names differ only by ``left`` / ``right`` (``left_eye`` / ``right_eye``, also
    ``l_`` / ``r_`` prefixes): the keypoints that trade places when the image is mirrored."""
    index = {n.lower(): i for i, n in enumerate(names)}
    pairs: list[tuple[int, int]] = []
    for name, i in index.items():
        for left, right in (("left", "right"), ("l_", "r_")):
            if name.startswith(left):
                j = index.get(right + name[len(left):])
                if j is not None:
                    pairs.append((i, j))
                break
    return sorted(pairs)


def resolve_flip_pairs(spec: Sequence[Sequence[int | str]], names: Sequence[str], where: str) -> list[tuple[int, int]]:
    """Validate flip pairs given as 0-based indices or keypoint names; each keypoint in at most one pair."""
    index = {n: i for i, n in enumerate(names)}
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for pair in spec:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise UserError(f"{where}: a flip pair is two keypoints, got {pair!r}")
        ij: list[int] = []
        for p in pair:
            if isinstance(p, str):
                if p not in index:
                    raise UserError(f"{where}: flip pair {list(pair)}: no keypoint named {p!r}")
                ij.append(index[p])
            elif isinstance(p, int) and not isinstance(p, bool) and 0 <= p < len(names):
                ij.append(p)
            else:
                raise UserError(f"{where}: flip pair {list(pair)}: {p!r} is not a keypoint index 0..{len(names) - 1}")
        if ij[0] == ij[1] or ij[0] in seen or ij[1] in seen:
            raise UserError(f"{where}: flip pair {list(pair)} repeats a keypoint")
        seen.update(ij)
        out.append((ij[0], ij[1]))
    return out


def _finite(values: Any, what: str, where: str) -> list[float]:
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values):
        raise UserError(f"{where}: {what} must be a list of numbers")
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{where}: {what} holds a non-finite number")
    return [float(v) for v in values]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_text_file(path, encoding="utf-8"))  # regular files only: a FIFO never blocks
    except FileNotFoundError as exc:
        raise UserError(f"{path}: no such keypoints file") from exc
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise UserError(f"{path}: not COCO keypoints JSON (expected lists 'images', 'annotations', 'categories')")
    return data


def _category(data: dict[str, Any], path: Path, name: str | None) -> dict[str, Any]:
    cats = [c for c in data["categories"] if isinstance(c, dict) and isinstance(c.get("keypoints"), list)
            and c["keypoints"]]
    if name is not None:
        cats = [c for c in cats if c.get("name") == name]
        if not cats:
            raise UserError(f"{path}: no category named {name!r} with keypoints")
    if not cats:
        raise UserError(f"{path}: no category lists 'keypoints' names")
    if len(cats) > 1:
        raise UserError(f"{path}: {len(cats)} categories have keypoints "
                        f"({', '.join(repr(c.get('name')) for c in cats)}); choose one with data.category")
    return cats[0]


def load_coco_keypoints(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                        category: str | None = None, check_files: bool = True) -> KeypointSet:
    """Read a COCO keypoints file. ``image_root``: the folder ``file_name`` is relative to (default: the
    JSON's folder, then its ``images/`` sub-folder). ``category``: which category when several have
    keypoints. ``check_files``: missing image files are errors (naming the image id)."""
    path = Path(path)
    data = _read_json(path)
    cat = _category(data, path, category)
    names = [str(n) for n in cat["keypoints"]]
    k = len(names)
    where = f"{path}: category {cat.get('name')!r}"
    skeleton: list[tuple[int, int]] = []
    for edge in cat.get("skeleton") or []:
        if (not isinstance(edge, list) or len(edge) != 2 or not all(isinstance(e, int) and 1 <= e <= k for e in edge)):
            raise UserError(f"{where}: skeleton edge {edge!r} is not two 1-based keypoint indices (1..{k})")
        skeleton.append((edge[0] - 1, edge[1] - 1))
    pairs = (resolve_flip_pairs(cat["flip_pairs"], names, f"{where} flip_pairs") if cat.get("flip_pairs")
             else flip_pairs_from_names(names))

    if image_root is not None:
        root = Path(image_root)
    else:
        root = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    images: dict[int, dict[str, Any]] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) or not isinstance(img.get("file_name"), str):
            raise UserError(f"{path}: image entry {str(img)[:80]!r} needs an integer id and a file_name")
        images[img["id"]] = img

    instances: list[KeypointInstance] = []
    skipped = {"crowd": 0, "no_keypoints": 0, "other_category": 0}
    checked: set[int] = set()
    for ann in data["annotations"]:
        aid = ann.get("id") if isinstance(ann, dict) else None
        here = f"{path}: annotation {aid}"
        if not isinstance(ann, dict) or not isinstance(aid, int):
            raise UserError(f"{path}: annotation {str(ann)[:80]!r} needs an integer id")
        if ann.get("category_id") != cat.get("id"):
            skipped["other_category"] += 1
            continue
        if ann.get("iscrowd"):
            skipped["crowd"] += 1
            continue
        kps = _finite(ann.get("keypoints"), "keypoints", here)
        if len(kps) != 3 * k:
            raise UserError(f"{here}: {len(kps)} keypoint numbers, expected {3 * k} ([x, y, v] for {k} keypoints)")
        arr = np.asarray(kps, dtype=np.float64).reshape(k, 3)
        if not np.isin(arr[:, 2], (0, 1, 2)).all():
            raise UserError(f"{here}: keypoint visibility must be 0, 1 or 2")
        if not (arr[:, 2] > 0).any():
            skipped["no_keypoints"] += 1
            continue
        bbox = _finite(ann.get("bbox"), "bbox", here)
        if len(bbox) != 4 or bbox[2] <= 0 or bbox[3] <= 0:
            raise UserError(f"{here}: bbox must be [x, y, w, h] with w, h > 0, got {bbox}")
        img = images.get(ann.get("image_id"))  # type: ignore[arg-type]
        if img is None:
            raise UserError(f"{here}: image_id {ann.get('image_id')!r} is not in 'images'")
        file = root / img["file_name"]
        if check_files and img["id"] not in checked:
            if not file.is_file():
                raise UserError(f"{here}: image {img['id']} file {file} does not exist")
            checked.add(img["id"])
        size = (int(img.get("width") or 0), int(img.get("height") or 0))
        instances.append(KeypointInstance(str(file), img["id"], aid, (bbox[0], bbox[1], bbox[2], bbox[3]), arr, size))
    if not instances:
        raise UserError(f"{path}: no annotation with labelled keypoints in category {cat.get('name')!r}")
    if any(skipped.values()):
        logger.info("%s: skipped annotations: %s", path, {k: v for k, v in skipped.items() if v})
    return KeypointSet(str(path), instances, names, skeleton, pairs, str(cat.get("name")), skipped)
