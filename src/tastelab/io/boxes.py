"""Object-detection labels: COCO detection JSON and YOLO txt, read into one :class:`BoxSet`.

Both formats end as the same data: per image its path, size (pixels as stored), boxes ``[x, y, w, h]`` in
pixels, contiguous class indices (``categories`` order) and COCO's ``iscrowd`` flags, plus the split the
dataset itself defines (YOLO's ``train:`` / ``val:`` folders, or a separate COCO file per split).

Labels are untrusted input: every bad row is a :class:`~tastelab.core.errors.UserError` that names where it
is (``file:line`` for YOLO txt, ``file: annotation id N`` for COCO JSON, which has no useful lines): a box
outside its image (beyond :data:`EDGE_TOLERANCE` pixels, which real exports overshoot by rounding), a
non-positive or non-finite size, an unknown category, a missing image. Images without boxes are kept (they
teach the detector what background looks like).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from tastelab.core.errors import UserError
from tastelab.io.images import ImageDecodeError, open_regular_file
from tastelab.io.textfiles import load_yaml, read_text_file

__all__ = ["EDGE_TOLERANCE", "BoxImage", "BoxSet", "detect_box_format", "load_box_labels", "load_coco_boxes",
           "load_yolo_boxes"]

#: Pixels a box may overshoot its image (annotation tools and rescaled exports round); clipped, not an error.
EDGE_TOLERANCE = 2.0
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class BoxImage:
    """One image and its boxes. ``boxes``: ``(N, 4)`` float ``[x, y, w, h]`` pixels of the stored image;
    ``labels``: ``(N,)`` indices into :attr:`BoxSet.categories`; ``crowd``: ``(N,)`` bool (COCO ``iscrowd``:
    ignored by the loss, matched-but-not-counted by mAP). ``key``: a path relative to the dataset root (split
    files hold keys); ``split``: the dataset's own split of the image, or None."""

    path: str
    key: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    split: str | None = None
    image_id: int | None = None


@dataclass
class BoxSet:
    """A detection dataset: images (with or without boxes) and the class names (index = label)."""

    images: list[BoxImage]
    categories: list[str]
    source: str
    kind: str
    category_ids: list[int] = field(default_factory=list)  # COCO ids of ``categories`` (YOLO: the class ids)

    @property
    def splits(self) -> set[str]:
        return {im.split for im in self.images if im.split is not None}

    def __len__(self) -> int:
        return len(self.images)


def _finite(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _image_size(path: Path, where: str) -> tuple[int, int]:
    """(width, height) from the file header (no decode); a missing or unreadable image names its label row."""
    try:
        with open_regular_file(path) as f, Image.open(f) as im:  # regular files only: a FIFO never blocks
            return int(im.size[0]), int(im.size[1])
    except ImageDecodeError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise UserError(f"{where}: image {path} not found") from None
        raise UserError(f"{where}: image {path} is not readable ({exc.reason})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{where}: image {path} is not readable ({exc})") from None


def _check_box(box: np.ndarray, width: int, height: int, where: str) -> np.ndarray:
    """Validate a ``[x, y, w, h]`` pixel box against its image; returns it clipped to the image."""
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise UserError(f"{where}: box [{x:g}, {y:g}, {w:g}, {h:g}] has a non-positive width or height")
    t = EDGE_TOLERANCE
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        raise UserError(f"{where}: box [{x:g}, {y:g}, {w:g}, {h:g}] lies outside the {width}x{height} image")
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    return np.array([x0, y0, x1 - x0, y1 - y0])


def _pack(rows: list[np.ndarray], labels: list[int], crowd: list[bool]) -> tuple[np.ndarray, ...]:
    return (np.asarray(rows, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
            np.asarray(crowd, dtype=bool))


# ---------------------------------------------------------------------- COCO
def _default_coco_root(path: Path, first_file: str | None) -> Path:
    """COCO files name images relative to a folder the JSON does not record: the JSON's folder, or its
    ``images/`` sub-folder (the common layout), whichever holds the first image."""
    if first_file is not None:
        for cand in (path.parent, path.parent / "images"):
            if (cand / first_file).exists():
                return cand
    return path.parent


def load_coco_boxes(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                    split: str | None = None) -> BoxSet:
    """Read a COCO detection JSON (``images``, ``annotations``, ``categories``; ``bbox`` = ``[x, y, w, h]``).

    Categories map to contiguous labels in id order. ``image_root``: the folder ``file_name`` is relative to
    (default: the JSON's folder or its ``images/``). ``split``: the split these images belong to (a dataset
    with one file per split)."""
    path = Path(path)
    try:
        data = json.loads(read_text_file(path, encoding="utf-8"))  # regular files only: a FIFO never blocks
    except FileNotFoundError:
        raise UserError(f"{path}: no such annotation file") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise UserError(f"{path}: not a COCO detection file (expected 'images' and 'categories' lists)")
    annotations = data.get("annotations") or []
    if not isinstance(annotations, list):
        raise UserError(f"{path}: 'annotations' must be a list")

    cats: dict[int, str] = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise UserError(f"{path}: category {c!r} needs an integer 'id' and a string 'name'")
        if c["id"] in cats:
            raise UserError(f"{path}: category id {c['id']} appears twice")
        cats[c["id"]] = c["name"]
    if not cats:
        raise UserError(f"{path}: no categories")
    names = [cats[i] for i in sorted(cats)]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: category names must be unique ({names})")
    label_of = {cid: i for i, cid in enumerate(sorted(cats))}

    first = next((im.get("file_name") for im in data["images"] if isinstance(im, dict)), None)
    root = Path(image_root) if image_root is not None else _default_coco_root(path, first)
    entries: dict[int, dict[str, Any]] = {}
    for im in data["images"]:
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise UserError(f"{path}: image entry {str(im)[:120]} needs an integer 'id' and a 'file_name'")
        where = f"{path}: image id {im['id']}"
        if im["id"] in entries:
            raise UserError(f"{where}: the id appears twice")
        file = root / im["file_name"]
        width, height = _image_size(file, where)
        declared = (im.get("width"), im.get("height"))
        if declared != (None, None) and declared != (width, height):
            raise UserError(f"{where}: {file} is {width}x{height} pixels but the annotation says "
                            f"{declared[0]}x{declared[1]}")
        entries[im["id"]] = {"file": file, "name": im["file_name"], "w": width, "h": height,
                             "rows": [], "labels": [], "crowd": []}
    for n, ann in enumerate(annotations):
        aid = ann.get("id", f"#{n}") if isinstance(ann, dict) else f"#{n}"
        where = f"{path}: annotation id {aid}"
        if not isinstance(ann, dict):
            raise UserError(f"{where}: not an object")
        entry = entries.get(ann.get("image_id"))  # type: ignore[arg-type]
        if entry is None:
            raise UserError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in label_of:
            raise UserError(f"{where}: unknown category_id {ann.get('category_id')!r} "
                            f"(categories: {sorted(cats)})")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not _finite(bbox):
            raise UserError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
        entry["rows"].append(_check_box(np.asarray(bbox, dtype=np.float64), entry["w"], entry["h"], where))
        entry["labels"].append(label_of[ann["category_id"]])
        entry["crowd"].append(bool(ann.get("iscrowd", 0)))
    images = []
    for image_id, e in entries.items():
        boxes, labels, crowd = _pack(e["rows"], e["labels"], e["crowd"])
        images.append(BoxImage(path=str(e["file"]), key=Path(e["name"]).as_posix(), width=e["w"], height=e["h"],
                               boxes=boxes, labels=labels, crowd=crowd, split=split, image_id=image_id))
    return BoxSet(images=images, categories=names, source=str(path), kind="coco", category_ids=sorted(cats))


# ---------------------------------------------------------------------- YOLO
def _yolo_yaml(path: Path) -> Path:
    if path.is_dir():
        found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if not found:
            raise UserError(f"{path}: a YOLO dataset folder needs a data.yaml (class names and split folders)")
        return path / "data.yaml" if (path / "data.yaml").exists() else found[0]
    if not path.exists():
        raise UserError(f"{path}: no such file")
    return path


def _yolo_names(raw: Any, where: str) -> list[str]:
    if isinstance(raw, list) and all(isinstance(n, str) for n in raw):
        return list(raw)
    if isinstance(raw, dict) and all(isinstance(k, int) for k in raw) and sorted(raw) == list(range(len(raw))):
        return [str(raw[i]) for i in range(len(raw))]
    raise UserError(f"{where}: 'names' must be a list of class names or a mapping 0..K-1 -> name")


def _labels_file(image: Path) -> Path:
    """YOLO's convention: ``.../images/...`` -> ``.../labels/...`` (last ``images`` component), ``.txt``."""
    parts = list(image.parts)
    idx = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
    if idx is None:
        return image.with_suffix(".txt")
    parts[idx] = "labels"
    return Path(*parts).with_suffix(".txt")


def _read_yolo_txt(file: Path, width: int, height: int, n_classes: int) -> tuple[np.ndarray, ...]:
    rows: list[np.ndarray] = []
    labels: list[int] = []
    text = read_text_file(file, encoding="utf-8")  # regular files only; bad bytes name file:line
    for lineno, line in enumerate(text.splitlines(), start=1):
        where = f"{file}:{lineno}"
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise UserError(f"{where}: expected 'class cx cy w h' (5 fields), got {len(fields)}"
                            + (" (segmentation polygons are not boxes)" if len(fields) > 5 else ""))
        try:
            cls = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:])
        except ValueError:
            raise UserError(f"{where}: not a number in {line.strip()!r}") from None
        if not (0 <= cls < n_classes):
            raise UserError(f"{where}: unknown class {cls} (data.yaml names {n_classes} classes: 0..{n_classes - 1})")
        if not _finite([cx, cy, w, h]):
            raise UserError(f"{where}: non-finite coordinate in {line.strip()!r}")
        box = np.array([(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height])
        rows.append(_check_box(box, width, height, where))
        labels.append(cls)
    return _pack(rows, labels, [False] * len(rows))


def load_yolo_boxes(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> BoxSet:
    """Read a YOLO dataset: ``data.yaml`` (``names``, ``train`` / ``val`` / ``test`` image folders relative to
    ``path:``) and one ``labels/.../NAME.txt`` per image (``class cx cy w h``, normalised to the image). An
    image without a label file has no boxes. ``image_root`` overrides the yaml's ``path:``."""
    yml = _yolo_yaml(Path(path))
    try:
        cfg = load_yaml(read_text_file(yml, encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{yml}: not a readable YAML file ({exc})") from None
    if not isinstance(cfg, dict) or "names" not in cfg:
        raise UserError(f"{yml}: a YOLO data.yaml needs 'names' (and 'train' / 'val' image folders)")
    names = _yolo_names(cfg["names"], str(yml))
    base = Path(image_root) if image_root is not None else (yml.parent / str(cfg.get("path") or "."))
    images: list[BoxImage] = []
    for split in ("train", "val", "test"):
        spec = cfg.get(split)
        if spec is None:
            continue
        folders = spec if isinstance(spec, list) else [spec]
        for folder in folders:
            d = base / str(folder)
            if not d.is_dir():
                raise UserError(f"{yml}: {split}: {d} is not a folder of images (image list files are not supported)")
            for img in sorted(p for p in d.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES):
                width, height = _image_size(img, f"{yml}: {split}")
                label_file = _labels_file(img)
                if label_file.exists():
                    boxes, labels, crowd = _read_yolo_txt(label_file, width, height, len(names))
                else:
                    boxes, labels, crowd = _pack([], [], [])
                images.append(BoxImage(path=str(img), key=img.relative_to(base).as_posix(), width=width,
                                       height=height, boxes=boxes, labels=labels, crowd=crowd, split=split))
    if not images:
        raise UserError(f"{yml}: no images under its train / val / test folders")
    return BoxSet(images=images, categories=names, source=str(yml), kind="yolo",
                  category_ids=list(range(len(names))))


# ---------------------------------------------------------------------- dispatch
def detect_box_format(path: str | os.PathLike) -> str:
    """``coco`` for a ``.json`` file; ``yolo`` for a ``.yaml`` or a folder holding one."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return "coco"
    if p.suffix.lower() in (".yaml", ".yml") or (p.is_dir() and any(p.glob("*.y*ml"))):
        return "yolo"
    raise UserError(f"{p}: cannot tell its box format (a COCO .json or a YOLO data.yaml / folder); "
                    "set data.format")


def load_box_labels(path: str | os.PathLike, format: str = "auto", image_root: str | os.PathLike | None = None,
                    **options: Any) -> BoxSet:
    """Any registered box format (:data:`~tastelab.io.registries.BOX_FORMATS`), ``auto``-detected by default."""
    from tastelab.io.registries import BOX_FORMATS

    fmt = detect_box_format(path) if format == "auto" else format
    reader = BOX_FORMATS.get(fmt)
    return reader(path, image_root, **options)
