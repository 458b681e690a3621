"""Throughput of ``tastelab judge``: one shared run vs each metric alone, and the incremental re-run.

    PYTHONPATH=src python bench/judge_throughput.py [--checkpoints 6] [--prompts 4] [--seeds 4] [--threads 1]
                                                    [--json bench/results/judge_throughput.json]

Data: the DreamBooth photos in ../shared/data/dreambooth/images (512 px JPEGs), read in place: the first
subject's first 3 photos are the references; the other photos, in a fixed order, are the sample images of
``--checkpoints`` checkpoints x ``--prompts`` prompts x ``--seeds`` seeds (every sample a different photo, so no
content hash repeats and nothing is shared by accident). Samples are given to ``judge()`` as ``Sample``
objects (no file is copied).

Measured, in one process, after one warm-up run (imports, the LPIPS network's process-wide cache):

1. **shared vs alone**: wall time of a judge run with every default metric that can run here (offline: dino
   and clip_i and vendi and copy_similarity on the labelled MobileNetV2 stand-in, quality_model, sharpness,
   exposure_clipping, lpips_diversity; the hub-only clip_t and face_distance without a face in the
   references are unavailable and left out), against the sum of the wall times of one run per metric with
   only that metric enabled. Every run starts from an empty in-memory cache and loads its own encoders, as a
   user running the metrics one by one would. Goal: ratio >= 1.5 (one decode per image, one encoder pass
   per image for every metric that uses that encoder).
2. **incremental**: a first run on all checkpoints but the last, writing its cache file; a re-run with nothing
   new (the fixed cost: hashing files, reading the cache, the leaderboard -- no model is loaded when every
   value is cached, except face_distance's dlib detector, which has no cached value: the references have no
   face, so it finds that out again); a re-run after the last checkpoint was added (the models load once).
   Goal: the added checkpoint's run costs about new/total of the first run beyond the fixed cost.

Also measured: the same comparison for the four metrics that share the stand-in encoder (dino, clip_i, vendi,
copy_similarity), where the sharing happens; the other metrics have nothing to share but the decoded image.

Timings: the process's CPU time (``time.process_time``) is the primary measure, because wall time on a
machine shared with other jobs varies by 1.5x between identical runs; wall time is reported too. Every timed
run is repeated ``--repeat`` times (default 2) and the fastest kept (the incremental sequence is repeated whole,
each time with a fresh cache file); the ratios are from one invocation of this script, with ``--threads``
torch threads (default 1: CPU time then measures the work done, not how it was spread over cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dreambooth"


def photos() -> list[Path]:
    return [p for d in sorted((DATA / "images").iterdir()) if d.is_dir() for p in sorted(d.glob("*.jpg"))]


def make_samples(paths: list[Path], checkpoints: int, prompts: int, seeds: int) -> list:
    from tastelab.judge.samples import Sample

    need = checkpoints * prompts * seeds
    if len(paths) < need:
        raise SystemExit(f"{need} sample photos needed, {len(paths)} available: lower --checkpoints/--prompts/--seeds")
    out, it = [], iter(paths)
    for c in range(1, checkpoints + 1):
        for p in range(prompts):
            for s in range(seeds):
                out.append(Sample(path=next(it), checkpoint=f"lora-{c:06d}", epoch=c, prompt_idx=p,
                                  prompt=f"a photo of subject {p}", seed=s, layout="bench"))
    return out


class Timed:
    """A judge run's CPU seconds (this process), wall seconds and result."""

    def __init__(self, cpu: float, wall: float, result: object) -> None:
        self.cpu, self.wall, self.result = cpu, wall, result


def run(samples: list, refs: list[Path], metrics: dict | None = None, **kwargs) -> Timed:
    from tastelab.judge.run import judge

    config = {"metrics": metrics} if metrics is not None else None
    cpu, wall = time.process_time(), time.perf_counter()
    result = judge(samples, references=refs, config=config, device="cpu", progress=False, **kwargs)
    return Timed(time.process_time() - cpu, time.perf_counter() - wall, result)


def fastest(repeat: int, *args, **kwargs) -> Timed:
    """The fastest (CPU time) of ``repeat`` runs, each from an empty in-memory cache."""
    return min((run(*args, **kwargs) for _ in range(repeat)), key=lambda t: t.cpu)


#: The default metrics that embed images with one (stand-in) encoder, shared through the judge context.
ENCODER_GROUP = ("dino", "clip_i", "vendi", "copy_similarity")


def only(name: str, names: list[str]) -> dict:
    return {n: {"enabled": n == name} for n in names}


def main() -> None:
    import torch

    from tastelab.judge.metrics import METRICS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "judge_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pool = photos()
    refs, rest = pool[:3], pool[3:]
    samples = make_samples(rest, args.checkpoints, args.prompts, args.seeds)
    n = len(samples)
    names = list(METRICS.names())

    # warm-up on two checkpoints: imports and process-wide caches, so the timed runs compare like with like
    run(samples[: 2 * args.prompts * args.seeds], refs)

    full = fastest(args.repeat, samples, refs)
    ran = [m.name for m in full.result.metrics if m.status == "ran"]
    unavailable = {m.name: m.reason for m in full.result.metrics if m.status != "ran"}
    alone: dict[str, Timed] = {}
    for name in ran:
        alone[name] = fastest(args.repeat, samples, refs, only(name, names))
        assert [m.name for m in alone[name].result.metrics if m.status == "ran"] == [name], name
    alone_cpu = sum(t.cpu for t in alone.values())
    alone_wall = sum(t.wall for t in alone.values())
    print(f"{n} images, CPU s: shared run {full.cpu:.1f} ({n / full.cpu:.2f} images/s); each metric alone, summed "
          f"{alone_cpu:.1f} ({n / alone_cpu:.2f} images/s); ratio {alone_cpu / full.cpu:.2f}x "
          f"(wall: {full.wall:.1f} vs {alone_wall:.1f}, {alone_wall / full.wall:.2f}x)")
    group = [m for m in ENCODER_GROUP if m in ran]
    grouped = fastest(args.repeat, samples, refs, {m: {"enabled": m in group} for m in names})
    group_alone = sum(alone[m].cpu for m in group)
    print(f"the {len(group)} metrics sharing one encoder ({', '.join(group)}), CPU s: together {grouped.cpu:.1f}, "
          f"alone summed {group_alone:.1f}, ratio {group_alone / grouped.cpu:.2f}x")

    per_ckpt = args.prompts * args.seeds
    first_samples = samples[:-per_ckpt]
    sequences = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / f"judge_cache_{i}.sqlite"
            sequences.append((run(first_samples, refs, cache=cache), run(first_samples, refs, cache=cache),
                              run(samples, refs, cache=cache)))
    first = min((q[0] for q in sequences), key=lambda t: t.cpu)
    same = min((q[1] for q in sequences), key=lambda t: t.cpu)
    added = min((q[2] for q in sequences), key=lambda t: t.cpu)
    computed_same = sum(m.computed for m in same.result.metrics)
    computed_added = {m.name: m.computed for m in added.result.metrics if m.status == "ran"}
    new, total = per_ckpt, n
    marginal = (added.cpu - same.cpu) / max(first.cpu - same.cpu, 1e-9)
    incremental = {
        "first_run_images": len(first_samples), "first_run_cpu_s": round(first.cpu, 3),
        "first_run_wall_s": round(first.wall, 3),
        "rerun_unchanged_cpu_s": round(same.cpu, 3), "rerun_unchanged_wall_s": round(same.wall, 3),
        "rerun_unchanged_values_computed": computed_same,
        "rerun_added_checkpoint_cpu_s": round(added.cpu, 3), "rerun_added_checkpoint_wall_s": round(added.wall, 3),
        "added_images": new, "total_images": total, "values_computed_in_rerun": computed_added,
        "rerun_over_first": round(added.cpu / first.cpu, 3), "new_over_total": round(new / total, 3),
        "new_over_first_run_images": round(new / len(first_samples), 3),
        "beyond_fixed_cost_rerun_over_first": round(marginal, 3),
    }
    print(f"incremental, CPU s: first run ({len(first_samples)} images) {first.cpu:.1f}; unchanged re-run "
          f"{same.cpu:.1f} ({computed_same} values computed); re-run with 1 new checkpoint ({new} new of {total}) "
          f"{added.cpu:.1f}; rerun/first {added.cpu / first.cpu:.2f} vs new/total {new / total:.2f}; beyond the "
          f"fixed cost {marginal:.2f} vs new/first {new / len(first_samples):.2f}")

    out = {
        "data": "../shared/data/dreambooth/images (512 px JPEGs), read in place",
        "images": n, "checkpoints": args.checkpoints, "prompts": args.prompts, "seeds": args.seeds,
        "references": len(refs), "torch_threads": args.threads, "repeat_fastest_of": args.repeat, "device": "cpu",
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs (shared with other jobs)",
        "python": sys.version.split()[0], "torch": torch.__version__,
        "metrics_ran": ran, "metrics_unavailable": unavailable,
        "encoders": [{"spec": e.spec, "label": e.label} for e in full.result.encoders],
        "timing": "CPU seconds of this process (time.process_time), fastest of repeat_fastest_of; wall seconds too",
        "shared_run_cpu_s": round(full.cpu, 3), "shared_run_wall_s": round(full.wall, 3),
        "shared_images_per_cpu_s": round(n / full.cpu, 3),
        "alone_cpu_s": {m: round(t.cpu, 3) for m, t in alone.items()},
        "alone_wall_s": {m: round(t.wall, 3) for m, t in alone.items()},
        "alone_sum_cpu_s": round(alone_cpu, 3), "alone_sum_wall_s": round(alone_wall, 3),
        "alone_images_per_cpu_s": round(n / alone_cpu, 3),
        "speedup_shared_vs_alone": round(alone_cpu / full.cpu, 3),
        "speedup_shared_vs_alone_wall": round(alone_wall / full.wall, 3), "goal_speedup": 1.5,
        "encoder_group": {"metrics": group, "together_cpu_s": round(grouped.cpu, 3),
                          "alone_sum_cpu_s": round(group_alone, 3),
                          "speedup": round(group_alone / grouped.cpu, 3)},
        "incremental": incremental,
        "command": "PYTHONPATH=src python bench/judge_throughput.py",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
