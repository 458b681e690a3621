"""Class-label data sets for image classification: ImageFolder trees and ``path,label`` CSV files.

Both readers return a :class:`ClassRecords` (one :class:`ClassItem` per image: path, label, the split the
data itself assigns or None, and where it came from), registered in
:data:`tastelab.io.registries.CLASS_LABEL_FORMATS`. Problems a user caused are :class:`UserError` naming the
file and line (CSV) or the folder (ImageFolder); label names are data, never interpreted.

ImageFolder layouts:

* ``ROOT/train/<class>/*.jpg`` + ``ROOT/val/<class>/...`` [+ ``ROOT/test/<class>/...``]: the data's own split;
* ``ROOT/<class>/*.jpg``: one pool, split by the recipe's seeded fractions (persisted in ``split.json``).

CSV: a header with ``path`` and ``label`` columns (names configurable) and an optional ``split`` column
(train / val / test); relative paths resolve against ``image_root`` (default: the CSV's folder).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tastelab.core.errors import UserError
from tastelab.io.records import IMAGE_EXTENSIONS, list_images
from tastelab.io.textfiles import read_text_file

__all__ = ["SPLIT_NAMES", "ClassItem", "ClassRecords", "read_class_csv", "read_image_folder"]

#: Split names a data set may assign itself (folder names / the CSV's split column).
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class ClassItem:
    path: str
    label: str
    split: str | None = None
    source: str = ""  # "file:line" (CSV) or the folder (ImageFolder): what an error about this item names


@dataclass
class ClassRecords:
    """Labelled images; ``classes``: every label, sorted (the class index order)."""

    items: list[ClassItem]
    classes: list[str]
    kind: str
    source: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def read_image_folder(path: str | os.PathLike, image_root: str | None = None, *,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ClassRecords:
    """An ImageFolder tree (see the module docstring); classes are sub-folder names."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"{root}: ImageFolder root is not a folder")
    subdirs = _class_dirs(root)
    split_dirs = [d for d in subdirs if d.name in SPLIT_NAMES]
    items: list[ClassItem] = []
    notes: list[str] = []
    if split_dirs:
        if "train" not in {d.name for d in split_dirs}:
            raise UserError(f"{root}: has {', '.join(d.name for d in split_dirs)}/ but no train/ folder")
        others = [d.name for d in subdirs if d.name not in SPLIT_NAMES]
        if others:
            raise UserError(f"{root}: mixes split folders (train/val/test) with other folders ({', '.join(others)})")
        per_split: dict[str, set[str]] = {}
        for sd in split_dirs:
            classes = _class_dirs(sd)
            if not classes:
                raise UserError(f"{sd}: no class sub-folders (expected {sd}/<class>/<image>)")
            per_split[sd.name] = {c.name for c in classes}
            for cdir in classes:
                files = list_images(cdir, recursive=True, extensions=extensions)
                if not files and sd.name == "train":
                    raise UserError(f"{cdir}: class folder without images")
                items.extend(ClassItem(f, cdir.name, sd.name, str(cdir)) for f in files)
        train_classes = per_split["train"]
        for name, names in per_split.items():
            unknown = sorted(names - train_classes)
            if unknown:
                raise UserError(f"{root / name}: classes {unknown} have no training folder in {root / 'train'}")
        label_set = train_classes
    else:
        if not subdirs:
            raise UserError(f"{root}: no class sub-folders (expected {root}/<class>/<image> or train/ and val/)")
        for cdir in subdirs:
            files = list_images(cdir, recursive=True, extensions=extensions)
            if not files:
                raise UserError(f"{cdir}: class folder without images")
            items.extend(ClassItem(f, cdir.name, None, str(cdir)) for f in files)
        label_set = {d.name for d in subdirs}
    if len(label_set) < 2:
        raise UserError(f"{root}: classification needs at least 2 classes, found {sorted(label_set)}")
    return ClassRecords(items, sorted(label_set), "imagefolder", str(root), notes)


def read_class_csv(path: str | os.PathLike, image_root: str | None = None, *, path_column: str = "path",
                   label_column: str = "label", split_column: str = "split") -> ClassRecords:
    """A ``path,label[,split]`` CSV; every bad row is an error naming ``file:line``."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: label file not found")
    base = Path(image_root) if image_root else file.parent
    text = read_text_file(file)  # regular files only (a FIFO never blocks); bad bytes name file:line
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise UserError(f"{file}: empty label file")
    header = [h.strip() for h in rows[0]]
    for col in (path_column, label_column):
        if col not in header:
            raise UserError(f"{file}:1: no {col!r} column in the header {header} (expected {path_column},"
                            f"{label_column}[,{split_column}])")
    ip, il = header.index(path_column), header.index(label_column)
    isp = header.index(split_column) if split_column in header else None
    items: list[ClassItem] = []
    seen: dict[str, int] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{file}:{lineno}"
        if len(row) != len(header):
            raise UserError(f"{where}: {len(row)} fields, the header has {len(header)}")
        rel, label = row[ip].strip(), row[il].strip()
        if not rel:
            raise UserError(f"{where}: empty {path_column}")
        if not label:
            raise UserError(f"{where}: empty {label_column} for {rel}")
        split = row[isp].strip() if isp is not None else None
        if split is not None and split not in SPLIT_NAMES:
            raise UserError(f"{where}: {split_column} {split!r} is not one of {', '.join(SPLIT_NAMES)}")
        full = Path(rel) if Path(rel).is_absolute() else base / rel
        if not full.is_file():
            raise UserError(f"{where}: image {full} not found")
        key = str(full.resolve())
        if key in seen:
            raise UserError(f"{where}: {rel} is listed twice (first at line {seen[key]})")
        seen[key] = lineno
        items.append(ClassItem(str(full), label, split or None, where))
    if not items:
        raise UserError(f"{file}: no labelled rows")
    has_split = [it.split is not None for it in items]
    if any(has_split) and not all(has_split):
        first = next(it for it in items if it.split is None)
        raise UserError(f"{first.source}: empty {split_column} (give every row a split or none)")
    if any(has_split):
        train = {it.label for it in items if it.split == "train"}
        if not train:
            raise UserError(f"{file}: no row has split 'train'")
        stray = next((it for it in items if it.label not in train), None)
        if stray is not None:
            raise UserError(f"{stray.source}: label {stray.label!r} has no training rows")
        classes = sorted(train)
    else:
        classes = sorted({it.label for it in items})
    if len(classes) < 2:
        raise UserError(f"{file}: classification needs at least 2 classes, found {classes}")
    return ClassRecords(items, classes, "csv", str(file))
