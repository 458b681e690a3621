"""Calibrate the judge's copy threshold and the stand-in encoders' consistency ranges on DreamBooth photos.

    PYTHONPATH=src python bench/judge_copy_calibration.py [--encoder torchvision:mobilenet_v2] [--json OUT]

Data: ../shared/data/dreambooth/images/SUBJECT/*.jpg (20 subjects, 4-6 real photos each). Per subject the
first half of the photos (sorted by name, at least 2) are the references, the rest are held out.

- Copies (what an over-fit LoRA emits): each reference photo degraded three ways, a JPEG at quality 60,
  a 0.6x down-and-up resize, and a centre crop keeping 90% of each side (the three together too).
- Genuine (what a faithful LoRA emits): the subject's held-out photos -- the same subject, new pictures.
- Copy score = nearest-neighbour (max) cosine to the subject's references (copy_similarity's value).
- Consistency range: mean cosine of a held-out photo to its own references (hi) vs to the references of
  another subject of the same class (lo; dog vs dog2, sneaker vs sneaker...), dino / clip_i's protocol.

The threshold reported is the midpoint between the highest genuine score and the lowest copy score when they
separate (else the value maximising balanced accuracy).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dreambooth"


def degrade(img: Image.Image, how: str) -> Image.Image:
    """A copy of ``img`` as a LoRA that memorised it might render it."""
    out = img
    if how in ("crop", "all"):
        w, h = out.size
        dx, dy = int(w * 0.05), int(h * 0.05)
        out = out.crop((dx, dy, w - dx, h - dy))
    if how in ("resize", "all"):
        w, h = out.size
        out = out.resize((int(w * 0.6), int(h * 0.6)), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    if how in ("jpeg", "all"):
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=60)
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out


def subject_classes() -> dict[str, str]:
    classes: dict[str, str] = {}
    for line in (DATA / "prompts_and_classes.txt").read_text().splitlines():
        parts = line.strip().split(",")
        if len(parts) == 2 and parts[0] != "subject_name":
            classes[parts[0]] = parts[1]
    return classes


def main() -> None:
    from tastelab.judge.encoders import load_encoder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", default="torchvision:mobilenet_v2")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    enc = load_encoder(args.encoder, device="cpu", dtype="fp32")
    classes = subject_classes()
    subjects = sorted(p.name for p in (DATA / "images").iterdir() if p.is_dir())
    refs: dict[str, np.ndarray] = {}
    held: dict[str, np.ndarray] = {}
    copies: dict[str, list[float]] = {h: [] for h in ("jpeg", "resize", "crop", "all")}
    genuine: list[float] = []
    for s in subjects:
        photos = [Image.open(p).convert("RGB") for p in sorted((DATA / "images" / s).glob("*.jpg"))]
        k = max(2, len(photos) // 2)
        refs[s] = enc.embed_images(photos[:k])
        held[s] = enc.embed_images(photos[k:])
        genuine += (held[s] @ refs[s].T).max(axis=1).tolist()
        for how in copies:
            emb = enc.embed_images([degrade(p, how) for p in photos[:k]])
            copies[how] += (emb @ refs[s].T).max(axis=1).tolist()
    all_copies = [v for vals in copies.values() for v in vals]
    lo_g, hi_g, lo_c = min(genuine), max(genuine), min(all_copies)
    if lo_c > hi_g:
        threshold = (lo_c + hi_g) / 2
    else:
        cands = sorted(set(genuine + all_copies))
        threshold = max(cands, key=lambda t: (np.mean([c >= t for c in all_copies])
                                              + np.mean([g < t for g in genuine])) / 2)
    same = [float((held[s] @ refs[s].T).mean()) for s in subjects]
    other = [float((held[s] @ refs[o].T).mean()) for s in subjects for o in subjects
             if o != s and classes.get(o) == classes.get(s)]
    result = {
        "encoder": args.encoder, "label": enc.label, "subjects": len(subjects),
        "genuine_max_cos": {"n": len(genuine), "min": lo_g, "mean": statistics.mean(genuine), "max": hi_g},
        "copy_max_cos": {h: {"n": len(v), "min": min(v), "mean": statistics.mean(v)} for h, v in copies.items()},
        "threshold": round(threshold, 3),
        "copies_flagged": float(np.mean([c >= threshold for c in all_copies])),
        "genuine_flagged": float(np.mean([g >= threshold for g in genuine])),
        "consistency_same_subject_mean": statistics.mean(same),
        "consistency_other_same_class_mean": statistics.mean(other) if other else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
