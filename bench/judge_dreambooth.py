"""Evidence on real images: does ``tastelab judge`` pick the good checkpoint of simulated DreamBooth LoRAs?

    PYTHONPATH=src python bench/judge_dreambooth.py [--encoders torchvision:mobilenet_v2,torchvision:efficientnet_lite0]
                                                    [--out bench/results/judge_dreambooth]

Data: the 20 DreamBooth subjects in ../shared/data/dreambooth/images/SUBJECT/*.jpg (4-6 real photos each; classes
from prompts_and_classes.txt). Per subject the photos (sorted by name) are split: the first half (at least 2)
are the **references**, the rest are held out. Three simulated checkpoints of one LoRA, in training order:

- ``underfit`` (epoch 1): photos of OTHER subjects of the same class (dog vs dog2/dog3, backpack vs
  backpack_dog, toys, plushies) -- the model draws "a dog", not this dog. Subjects without another subject of
  their class here (9 of 20) get photos of other-class subjects instead (an easier case; reported apart);
- ``good`` (epoch 2): the subject's held-out photos -- this subject, new pictures;
- ``overfit`` (epoch 3): the reference photos re-emitted, degraded (one per reference, in turn: JPEG quality
  70; a 0.5x down-and-up resize; a centre crop keeping 94% of each side; all three) -- a memorised LoRA.

One prompt per subject ("a photo of a {class}"), the photos as its seeds. Each subject is judged with the default
config, once per encoder in ``--encoders``: offline there are no hub weights, so ``dino``, ``clip_i``, ``vendi``
and ``copy_similarity`` run on that labelled ImageNet stand-in (the first is what the judge falls back to; the
others are set through each metric's ``model:``). The alignment family cannot run offline (``clip_t`` needs
CLIP's text tower, which has no stand-in; ``vqa_score`` is off by default): the composite is re-weighted over
consistency, quality and diversity, and this bench says nothing about alignment.

Reported: how often ``good`` ranks first and how often it is the judge's ``recommended`` checkpoint (the
best-ranked one without a disqualifying flag -- by default ``copies_references`` -- the one a user would
pick), how often ``overfit`` gets ``copies_references`` (and any other checkpoint does: false flags), and
the identity-retrieval AUC of each consistency metric that ran: the probability that a
held-out photo of the subject scores higher than a photo of a same-class other subject (Mann-Whitney U / n1 n0;
pooled over subjects, and the mean of per-subject AUCs). The copy thresholds were calibrated on these same
photos (bench/judge_copy_calibration.py, with other degradation strengths), so the flag rates are not an
out-of-sample test of the thresholds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dreambooth"
CHECKPOINTS = ("underfit", "good", "overfit")
DEGRADATIONS = ("jpeg", "resize", "crop", "all")
CONSISTENCY = ("dino", "clip_i", "face_distance")


def subject_classes() -> dict[str, str]:
    classes: dict[str, str] = {}
    for line in (DATA / "prompts_and_classes.txt").read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(",")
        if len(parts) == 2 and parts[0] != "subject_name":
            classes[parts[0]] = parts[1]
    return classes


def degrade(path: Path, how: str, out: Path) -> Path:
    """``path``'s photo as a LoRA that memorised it might render it, saved losslessly at ``out``."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    if how in ("crop", "all"):
        dx, dy = round(w * 0.03), round(h * 0.03)
        img = img.crop((dx, dy, w - dx, h - dy)).resize((w, h), Image.Resampling.BICUBIC)
    if how in ("resize", "all"):
        img = img.resize((w // 2, h // 2), Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.BILINEAR)
    if how in ("jpeg", "all"):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=70)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    img.save(out)
    return out


def auc(pos: list[float], neg: list[float], higher_is_better: bool = True) -> float | None:
    """P(a positive scores better than a negative), ties counted half: Mann-Whitney U / (n1 n0)."""
    from scipy.stats import mannwhitneyu

    if not pos or not neg:
        return None
    a, b = (pos, neg) if higher_is_better else ([-x for x in pos], [-x for x in neg])
    return float(mannwhitneyu(a, b, alternative="greater").statistic) / (len(a) * len(b))


def build_subject(subject: str, cls: str, by_class: dict[str, list[str]], subjects: list[str],
                  tmp: Path) -> tuple[list[Path], list[Any], str]:
    """References, the three checkpoints' samples, and whether ``underfit`` is same-class or other-class."""
    from tastelab.judge.samples import Sample

    photos = sorted((DATA / "images" / subject).glob("*.jpg"))
    k = max(2, len(photos) // 2)
    refs, held = photos[:k], photos[k:]
    others = [s for s in by_class[cls] if s != subject]
    kind = "same-class" if others else "other-class"
    if not others:  # the next subjects (alphabetically, cyclic) of other classes
        i = subjects.index(subject)
        others = [subjects[(i + j) % len(subjects)] for j in range(1, 4)]
    pools = [sorted((DATA / "images" / o).glob("*.jpg")) for o in others]
    under = [p for group in zip(*pools, strict=False) for p in group][:max(3, len(held))]  # round-robin
    folder = tmp / subject
    folder.mkdir(parents=True)
    over = [degrade(r, DEGRADATIONS[i % len(DEGRADATIONS)], folder / f"copy_{i}_{DEGRADATIONS[i % 4]}.png")
            for i, r in enumerate(refs)]
    prompt = f"a photo of a {cls}"
    samples = [Sample(path=p, checkpoint=ckpt, epoch=e, prompt_idx=0, prompt=prompt, seed=i, layout="bench")
               for e, (ckpt, paths) in enumerate(zip(CHECKPOINTS, (under, held, over), strict=True), start=1)
               for i, p in enumerate(paths)]
    return refs, samples, kind


def encoder_config(encoder: str) -> dict[str, Any] | None:
    """The default config, or the embedding metrics moved to ``encoder`` (through their ``model:``)."""
    if encoder == "torchvision:mobilenet_v2":
        return None  # the default: the judge falls back to its MobileNetV2 stand-in by itself
    return {"metrics": {m: {"model": encoder} for m in ("dino", "clip_i", "vendi", "copy_similarity")}}


def judge_all(encoder: str, subjects: list[str], classes: dict[str, str], tmp: Path) -> dict[str, Any]:
    from tastelab.judge.run import judge

    by_class: dict[str, list[str]] = {}
    for s in subjects:
        by_class.setdefault(classes[s], []).append(s)
    per_subject = []
    values: dict[str, dict[str, dict[str, list[float]]]] = {}  # metric -> subject -> checkpoint -> values
    metric_runs: dict[str, Any] = {}
    start = time.perf_counter()
    for subject in subjects:
        refs, samples, kind = build_subject(subject, classes[subject], by_class, subjects, tmp / encoder.split(":")[1])
        result = judge(samples, references=refs, config=encoder_config(encoder), device="cpu", progress=False)
        rows = {r.checkpoint: r for r in result.leaderboard.rows}
        ranked = [r.checkpoint for r in result.leaderboard.rows]
        per_subject.append({
            "subject": subject, "class": classes[subject], "underfit": kind, "references": len(refs),
            "images": {c: sum(1 for s in samples if s.checkpoint == c) for c in CHECKPOINTS},
            "ranking": ranked, "recommended": result.recommended,
            "composite": {c: round(rows[c].composite, 4) for c in CHECKPOINTS},
            "composite_ci": {c: [round(rows[c].composite_low, 4), round(rows[c].composite_high, 4)]
                             for c in CHECKPOINTS},
            "tied_with_best": [c for c in CHECKPOINTS if rows[c].tied_with_best],
            "families": {c: {f: round(v, 4) for f, v in rows[c].family_scores.items() if v == v}
                         for c in CHECKPOINTS},
            "copy_share": {c: rows[c].copy_share for c in CHECKPOINTS},
            "flags": {c: rows[c].flags for c in CHECKPOINTS},
        })
        for row in result.scores:
            if row["image"] is not None:
                values.setdefault(row["metric"], {}).setdefault(subject, {}).setdefault(
                    row["checkpoint"], []).append(row["value"])
        for m in result.metrics:
            metric_runs.setdefault(m.name, {"status": m.status, "reason": m.reason, "resolved": m.resolved})
        metric_runs["_copy_threshold"] = result.config.copying.similarity_threshold
        metric_runs["_encoders"] = sorted({f"{e.spec}: {e.label}" for e in result.encoders})
    seconds = time.perf_counter() - start

    n = len(per_subject)
    same = [p for p in per_subject if p["underfit"] == "same-class"]
    summary: dict[str, Any] = {
        "subjects": n, "same_class_subjects": len(same),
        "good_first": sum(p["ranking"][0] == "good" for p in per_subject),
        "good_first_same_class": sum(p["ranking"][0] == "good" for p in same),
        "good_recommended": sum(p["recommended"] == "good" for p in per_subject),
        "good_recommended_same_class": sum(p["recommended"] == "good" for p in same),
        "good_tied_with_best": sum("good" in p["tied_with_best"] for p in per_subject),
        "overfit_flagged": sum("copies_references" in p["flags"]["overfit"] for p in per_subject),
        "good_flagged": sum("copies_references" in p["flags"]["good"] for p in per_subject),
        "underfit_flagged": sum("copies_references" in p["flags"]["underfit"] for p in per_subject),
        "first_place": {c: sum(p["ranking"][0] == c for p in per_subject) for c in CHECKPOINTS},
        "seconds": round(seconds, 1),
    }
    aucs: dict[str, Any] = {}
    for metric in CONSISTENCY:
        if metric not in values:
            aucs[metric] = {"ran": False, "reason": metric_runs.get(metric, {}).get("reason", "not run")}
            continue
        higher = metric != "face_distance"
        pooled_pos, pooled_neg, per = [], [], []
        for p in same:
            v = values[metric].get(p["subject"], {})
            pos, neg = v.get("good", []), v.get("underfit", [])
            pooled_pos += pos
            pooled_neg += neg
            a = auc(pos, neg, higher)
            if a is not None:
                per.append(a)
        all_pos = [x for s in values[metric].values() for x in s.get("good", [])]
        all_neg = [x for s in values[metric].values() for x in s.get("underfit", [])]
        aucs[metric] = {
            "ran": True, "encoder": metric_runs[metric]["resolved"].get("label", ""),
            "auc_same_class_pooled": round(auc(pooled_pos, pooled_neg, higher) or float("nan"), 4),
            "auc_same_class_mean_per_subject": round(statistics.fmean(per), 4) if per else None,
            "auc_all_subjects_pooled": round(auc(all_pos, all_neg, higher) or float("nan"), 4),
            "positives_same_class": len(pooled_pos), "negatives_same_class": len(pooled_neg),
        }
    return {"encoder": encoder, "summary": summary, "consistency_auc": aucs, "metrics": metric_runs,
            "per_subject": per_subject}


def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = ["# tastelab judge on simulated DreamBooth checkpoints", "",
             f"`{command}` (see the script's docstring for the protocol).", "",
             "| Encoder (offline stand-in) | good ranked 1st | good recommended | overfit flagged "
             "`copies_references` | good / underfit flagged | copy threshold | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        n, m = s["subjects"], s["same_class_subjects"]
        lines.append(
            f"| `{r['encoder']}` | {s['good_first']}/{n} (same-class under-fit: {s['good_first_same_class']}/{m}) "
            f"| {s['good_recommended']}/{n} ({s['good_recommended_same_class']}/{m}) | "
            f"{s['overfit_flagged']}/{n} | {s['good_flagged']}/{n} / {s['underfit_flagged']}/{n} | "
            f"{r['metrics']['_copy_threshold']:.3f} | {s['seconds']} |")
    lines += ["", "Identity-retrieval AUC (held-out photo of the subject vs photo of a same-class other subject, "
              "scored against the subject's references):", "",
              "| Encoder | metric | AUC same-class, pooled | mean per-subject AUC | AUC all 20 subjects "
              "(incl. other-class under-fit) | n pos / neg (same-class) |", "|---|---|---|---|---|---|"]
    for r in results:
        for metric, a in r["consistency_auc"].items():
            if not a["ran"]:
                lines.append(f"| `{r['encoder']}` | {metric} | unavailable: {a['reason'][:90]} | | | |")
                continue
            lines.append(f"| `{r['encoder']}` | {metric} | {a['auc_same_class_pooled']:.3f} | "
                         f"{a['auc_same_class_mean_per_subject']:.3f} | {a['auc_all_subjects_pooled']:.3f} | "
                         f"{a['positives_same_class']} / {a['negatives_same_class']} |")
    for r in results:
        lines += ["", f"## Per subject: `{r['encoder']}`", "",
                  "| subject | class | under-fit | ranking | recommended | composite (underfit / good / overfit) "
                  "| flagged |",
                  "|---|---|---|---|---|---|---|"]
        for p in r["per_subject"]:
            flagged = ", ".join(c for c in CHECKPOINTS if "copies_references" in p["flags"][c]) or "-"
            comp = " / ".join(f"{p['composite'][c]:.3f}" for c in CHECKPOINTS)
            lines.append(f"| {p['subject']} | {p['class']} | {p['underfit']} | {' > '.join(p['ranking'])} | "
                         f"{p['recommended'] or '-'} | {comp} | {flagged} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="torchvision:mobilenet_v2,torchvision:efficientnet_lite0")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "judge_dreambooth")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    classes = subject_classes()
    subjects = sorted(p.name for p in (DATA / "images").iterdir() if p.is_dir())
    missing = [s for s in subjects if s not in classes]
    if missing:
        raise SystemExit(f"no class for {missing} in prompts_and_classes.txt")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for encoder in args.encoders.split(","):
            r = judge_all(encoder.strip(), subjects, classes, Path(tmp))
            s = r["summary"]
            n = s["subjects"]
            print(f"{encoder}: good first {s['good_first']}/{n}, recommended "
                  f"{s['good_recommended']}/{n}, overfit flagged {s['overfit_flagged']}/{n}, "
                  f"false flags good {s['good_flagged']} underfit {s['underfit_flagged']}; AUC "
                  + ", ".join(f"{m} {a['auc_same_class_pooled']}" for m, a in r["consistency_auc"].items() if a["ran"]))
            results.append(r)
    command = "PYTHONPATH=src python bench/judge_dreambooth.py"
    out = {"command": command, "data": "../shared/data/dreambooth (20 subjects)", "device": "cpu",
           "python": sys.version.split()[0], "torch": torch.__version__, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(results, command), encoding="utf-8")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
