"""A judge run's files: ``scores.parquet``, ``leaderboard.csv`` / ``.json``, ``report.html``, and the small
JPEG thumbnails the report shows.

Every file is written to a temporary name beside its target and renamed into place, so an interrupted run
leaves the previous version, never half a file. Thumbnails come from pixels the run already decoded;
an image the run did not decode (every value was cached) is decoded here, once.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tastelab.core.atomic import write_text_atomic
from tastelab.io import images as images_io
from tastelab.judge.report import render_report

if TYPE_CHECKING:
    from tastelab.judge.context import JudgeImage
    from tastelab.judge.metrics.base import GroupKey
    from tastelab.judge.run import JudgeResult

__all__ = ["THUMB_SIZE", "ensure_thumbnail", "leaderboard_records", "report_images", "thumbnail", "write_outputs"]

THUMB_SIZE = 192


def thumbnail(image: Any, size: int = THUMB_SIZE) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.convert("RGB").save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def ensure_thumbnail(im: JudgeImage, thumbs: dict[str, bytes]) -> bytes:
    """The image's small JPEG for the report, made from its pixels when decoded already, else decoded here
    (an image the run did not decode because every metric value was cached): once per run either way."""
    if im.sha not in thumbs:
        image = im.image if im.image is not None else images_io.load_image(im.path)
        thumbs[im.sha] = thumbnail(image)
    return thumbs[im.sha]


def _atomic_bytes(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def report_images(result: JudgeResult) -> list[JudgeImage]:
    """The images the report shows: the first seed of each checkpoint x prompt, the references, and each
    flagged copy with its nearest reference or training image."""
    firsts: dict[GroupKey, JudgeImage] = {}
    for im in result.images:
        assert im.sample is not None
        firsts.setdefault((im.sample.checkpoint, im.sample.prompt_idx), im)
    shown = [*firsts.values(), *result.references]
    for c in result.copies:
        shown += [c.image] + ([c.nearest] if c.nearest is not None else [])
    return shown


def leaderboard_records(result: JudgeResult) -> list[dict[str, Any]]:
    """Leaderboard rows in rank order (``leaderboard.json``), with each checkpoint's epoch and step."""
    meta = {r["checkpoint"]: r for r in result.checkpoints}
    return [{**r, "epoch": meta.get(r["checkpoint"], {}).get("epoch"),
             "step": meta.get(r["checkpoint"], {}).get("step")} for r in result.leaderboard.to_records()]


def write_outputs(result: JudgeResult, out: str | os.PathLike) -> None:
    """``scores.parquet``, ``leaderboard.csv``, ``leaderboard.json`` and ``report.html`` in ``out``
    (each written to a temporary file beside it and renamed: a crash leaves the previous version)."""
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for im in report_images(result):
        ensure_thumbnail(im, result.thumbnails)
    table = result.scores_table()
    _atomic_bytes(out / "scores.parquet", lambda p: pq.write_table(table, p))
    records = leaderboard_records(result)
    write_text_atomic(out / "leaderboard.json", json.dumps(records, indent=2, allow_nan=False) + "\n")
    columns = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: (";".join(v) if isinstance(v, list) else ("" if v is None else v)) for k, v in r.items()})
    write_text_atomic(out / "leaderboard.csv", buf.getvalue())
    write_text_atomic(out / "report.html", render_report(result))
