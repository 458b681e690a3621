"""The data layer's registries of label formats (``data.format``, ``load_records(format=...)``).

Three tables, one mechanism (:class:`~tastelab.core.registry.Registry`) and one entry schema: each entry is a
reader ``(path, image_root=None, **options)``; metadata ``reads`` names what it returns, ``options`` maps the
reader's keyword arguments to the ``data.*`` recipe fields that feed them (:func:`reader_options` is the one
place a data section becomes reader keywords).

- :data:`LABEL_FORMATS`: quality labels and per-image task labels. ``reads`` is ``"records"`` (a
  :class:`~tastelab.io.records.RecordSet`), ``"comparisons"`` (A/B pairs) or ``"keypoints"`` (a
  :class:`~tastelab.io.keypoints.KeypointSet`, read by the ``task`` named in its metadata); ``labelled`` says
  whether it can train a quality model (absent for task formats, so quality recipes refuse them); a quality
  recipe field set for a format that does not take it is an error, not ignored.
- :data:`CLASS_LABEL_FORMATS` (``reads="classes"``) and :data:`BOX_FORMATS` (``reads="boxes"``): the
  classification and detection tasks' formats. They stay separate tables (not LABEL_FORMATS entries filtered
  by ``reads``) because a format name means something only within its task (``csv`` of class labels is not a
  score table) and each task's errors name its own kind ("unknown class label format ...").

Entries are lazy so recipes validate without importing the readers.
"""

from __future__ import annotations

from typing import Any

from tastelab.core.registry import Registry

__all__ = ["BOX_FORMATS", "CLASS_LABEL_FORMATS", "FORMAT_REGISTRIES", "LABEL_FORMATS", "reader_options"]

LABEL_FORMATS: Registry = Registry("label format")
LABEL_FORMATS.register_lazy(
    "ava", "tastelab.io.records:load_ava", reads="records", labelled=True,
    options={"image_root": "image_root", "train_list": "ava_train_list", "test_list": "ava_test_list"},
    description="AVA.txt: id + 10 vote counts per line (distribution labels)")
LABEL_FORMATS.register_lazy(
    "mos", "tastelab.io.records:load_mos_table", reads="records", labelled=True,
    options={"image_root": "image_root", "path_column": "path_column", "score_column": "score_column",
             "score_range": "score_range"},
    description="CSV/TSV table of mean opinion scores (KonIQ, SPAQ, KADID, BIQ2021, ...)")
LABEL_FORMATS.register_lazy(
    "personal", "tastelab.io.records:load_personal_scores", reads="records", labelled=True,
    options={"image_root": "image_root", "score_range": "score_range"},
    description="score files of the image_comparison A/B tool (JSON or CSV with relative_path)")
LABEL_FORMATS.register_lazy(
    "pairs", "tastelab.io.votes:load_votes", reads="comparisons", labelled=True,
    options={"image_root": "image_root"},
    description="A/B votes: image_a,image_b,votes_a,votes_b")
LABEL_FORMATS.register_lazy(
    "folder", "tastelab.io.records:load_folder", reads="records", labelled=False, options={},
    description="every image under a folder, unlabelled (scoring, feature caching)")
LABEL_FORMATS.register_lazy(
    "coco_keypoints", "tastelab.io.keypoints:load_coco_keypoints", reads="keypoints", task="pose",
    options={"image_root": "image_root", "category": "category"},
    description="COCO keypoints JSON (top-down pose / landmarks; no 'labelled': quality recipes cannot take it)")

#: Class-label formats for image classification (``data.format`` of ``task: classification`` recipes). Each
#: entry is a reader ``(path, image_root=None, **options) -> tastelab.io.classes.ClassRecords``.
CLASS_LABEL_FORMATS: Registry = Registry("class label format")
CLASS_LABEL_FORMATS.register_lazy(
    "imagefolder", "tastelab.io.classes:read_image_folder", reads="classes", task="classification",
    options={"image_root": "image_root"},
    description="ROOT/<class>/<image> or ROOT/train|val|test/<class>/<image> (torchvision ImageFolder)")
CLASS_LABEL_FORMATS.register_lazy(
    "csv", "tastelab.io.classes:read_class_csv", reads="classes", task="classification",
    options={"image_root": "image_root", "path_column": "path_column", "label_column": "label_column",
             "split_column": "split_column"},
    description="CSV with path,label[,split] columns; relative paths resolve against image_root or the CSV's folder")

#: Object-detection label formats (``data.format`` of ``task: detection`` recipes): readers
#: ``(path, image_root=None, **options) -> tastelab.io.boxes.BoxSet``.
BOX_FORMATS: Registry = Registry("box format")
BOX_FORMATS.register_lazy(
    "coco", "tastelab.io.boxes:load_coco_boxes", reads="boxes", task="detection",
    options={"image_root": "image_root"},
    description="COCO detection JSON (images, annotations with bbox [x, y, w, h], categories; iscrowd kept)")
BOX_FORMATS.register_lazy(
    "yolo", "tastelab.io.boxes:load_yolo_boxes", reads="boxes", task="detection",
    options={"image_root": "image_root"},
    description="YOLO txt: data.yaml (names, train/val folders) + labels/*.txt rows 'class cx cy w h' (normalised)")

#: Every label-format table: the tests hold each entry of each to the one schema above.
FORMAT_REGISTRIES: tuple[Registry, ...] = (LABEL_FORMATS, CLASS_LABEL_FORMATS, BOX_FORMATS)


def reader_options(registry: Registry, fmt: str, data: Any) -> dict[str, Any]:
    """The keyword arguments ``fmt``'s reader takes from a recipe's data section ``data`` (any object with the
    fields its ``options`` metadata names): fields left ``None`` are not passed, so the reader's own default
    applies. The quality trainer, classification and pose all build their reader calls here."""
    options = registry.metadata(fmt).get("options", {})
    return {kw: getattr(data, name) for kw, name in options.items() if getattr(data, name) is not None}
