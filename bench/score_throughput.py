"""Scoring throughput: model-only forward vs. end-to-end `tastelab score` vs. a naive per-image loop.

Everything is measured in one process and one run so the ratios are comparable:

    python bench/score_throughput.py --images ../shared/data/biq2021/images --out bench/results/score.json

- forward_ips:     the PyTorch model alone on pre-decoded, pre-resized tensors (best of several batch sizes)
- end_to_end_ips:  Scorer.score_files(backend="torch") -> a .jsonl file (decode + resize + model + writing)
- naive_ips:       the seed-script loop: open, preprocess, forward one image at a time
- onnx_forward_ips: the same model through ONNX Runtime (the export the default path caches), best batch
- default_end_to_end_ips: what a user gets with no options: ``Scorer(model)`` (on a CPU: the cached ONNX
  export, NumPy decoding, default batch size and workers) -> .jsonl; compared with the best forward
  throughput of either runtime (``ratio_default_e2e_best_forward``, the goal is >= 0.9)
- forward and end-to-end (both runtimes) are measured ``--repeats`` times, interleaved, and the medians reported: on a
  shared machine a neighbour's burst then lands in one repeat instead of skewing one side of the ratio
- end_to_end_device_decode_ips: the same run with ``decode="device"`` (batched JPEG decoding and resizing
  with TorchCodec / torchvision on the model's device: nvJPEG on CUDA, libjpeg on a CPU)
- peak RSS of a scoring subprocess over 500 and over 5,000 images (streaming: it should stay flat);
  measured with a small ViT (decode-bound, so 5,000 images take seconds rather than minutes) on the
  default path (its ONNX export made beforehand, so the child process never imports torch).

The ONNX cache is a temporary folder (``TASTELAB_CACHE``), filled before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger("bench")

TINY_VIT = {"model_type": "siglip_vision_model", "hidden_size": 192, "intermediate_size": 768,
            "num_hidden_layers": 4, "num_attention_heads": 3, "image_size": 224, "patch_size": 16}


def _tiny_vit_folder(root: Path) -> Path:
    from tastelab import save_model
    from tastelab.io.images import PreprocessConfig
    from tastelab.models import ModelConfig, TasteModel
    from tastelab.models.config import BackboneConfig, HeadConfig

    torch.manual_seed(0)
    cfg = ModelConfig(name="small-vit", backbone=BackboneConfig(kind="hf", name="small-vit", hf_config=TINY_VIT),
                      head=HeadConfig(kind="distribution", hidden=[128]), backbone_in_folder=True,
                      preprocess=PreprocessConfig(size=224, mean=(0.5,) * 3, std=(0.5,) * 3))
    return save_model(TasteModel.build(cfg), root / "small-vit")


def _images(folder: Path, n: int) -> list[str]:
    from tastelab.io.records import list_images

    paths = list_images(folder)
    if not paths:
        raise SystemExit(f"no images in {folder}")
    reps = (n + len(paths) - 1) // len(paths)
    return (paths * reps)[:n]


def forward_ips(scorer, batch_sizes: list[int], seconds: float) -> tuple[float, int]:
    pre = scorer.model.preprocess
    best = (0.0, batch_sizes[0])
    for bs in batch_sizes:
        x = torch.randint(0, 256, (bs, 3, pre.size, pre.size), dtype=torch.uint8)
        scorer._run(x)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            scorer._run(x)
            n += bs
        ips = n / (time.perf_counter() - t0)
        logger.info("forward batch %d: %.2f img/s", bs, ips)
        best = max(best, (ips, bs))
    return best


def end_to_end_ips(scorer, paths: list[str]) -> float:
    from tastelab.inference.scoring import score_paths_to_file

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        counts = score_paths_to_file(scorer, paths, Path(tmp) / "scores.jsonl", resume=False)
        dt = time.perf_counter() - t0
    assert counts["scored"] + counts["errors"] == len(paths)
    return len(paths) / dt


def naive_ips(model, paths: list[str]) -> float:
    """What seed scripts do: PIL open + torchvision transforms + forward, one image at a time."""
    from PIL import Image
    from torchvision import transforms

    pre = model.preprocess
    tf = transforms.Compose([transforms.Resize((pre.size, pre.size)), transforms.ToTensor(),
                             transforms.Normalize(pre.mean, pre.std)])
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in paths:
            x = tf(Image.open(p).convert("RGB")).unsqueeze(0)
            model(x)
    return len(paths) / (time.perf_counter() - t0)


_RSS_CHILD = """
import json, resource, sys, tempfile
from pathlib import Path
from tastelab.inference.scoring import Scorer, score_paths_to_file
paths = json.loads(Path(sys.argv[2]).read_text())
scorer = Scorer(sys.argv[1], batch_size=int(sys.argv[3]), workers=int(sys.argv[4]))
with tempfile.TemporaryDirectory() as tmp:
    score_paths_to_file(scorer, paths, Path(tmp) / "s.jsonl", resume=False)
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"main_mb": self_kb / 1024, "worker_mb": kids_kb / 1024}))
"""


def peak_rss(model: str, paths: list[str], batch_size: int, workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp) / "paths.json"
        lst.write_text(json.dumps(paths))
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, model, str(lst), str(batch_size), str(workers)],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="default", help="model folder or preset (default: the shipped default)")
    ap.add_argument("--n", type=int, default=300, help="images for the end-to-end run")
    ap.add_argument("--naive-n", type=int, default=60, help="images for the naive loop")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--forward-seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved forward / end-to-end repeats (median)")
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    cache = tempfile.TemporaryDirectory()
    os.environ["TASTELAB_CACHE"] = cache.name
    os.environ.pop("TASTELAB_AUTO_ONNX", None)
    from tastelab.inference.scoring import Scorer

    scorer = Scorer(args.model, backend="torch", workers=args.workers)
    workers = scorer.workers
    default_bs = scorer.batch_size
    default = Scorer(args.model, workers=args.workers)  # exports once into the temporary cache (untimed)
    result: dict = {
        "command": "python bench/score_throughput.py " + " ".join(sys.argv[1:]),
        "model": scorer.model.config.name, "input_size": scorer.model.preprocess.size,
        "scorer_default_batch_size": default_bs, "workers": workers, "device": str(scorer.device),
        "default_backend": default.backend, "default_batch_size": default.batch_size,
        "default_workers": default.workers,
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
    }
    _, fwd_bs = forward_ips(scorer, sorted({1, 2, 4, 8, 16, 32}), args.forward_seconds)
    # End to end with the batch size the model likes best; forward re-measured at that size in each repeat.
    scorer.batch_size = fwd_bs
    onnx_bs = 0
    if default.backend == "onnx":
        _, onnx_bs = forward_ips(default, sorted({1, 2, 4, 8, 16}), args.forward_seconds)
    paths = _images(args.images, args.n)
    fwds, e2es, naives, ofwds, de2es = [], [], [], [], []
    for r in range(args.repeats):
        fwds.append(forward_ips(scorer, [fwd_bs], args.forward_seconds)[0])
        e2es.append(end_to_end_ips(scorer, paths))
        naives.append(naive_ips(scorer.model, _images(args.images, args.naive_n)))
        if onnx_bs:
            ofwds.append(forward_ips(default, [onnx_bs], args.forward_seconds)[0])
        de2es.append(end_to_end_ips(default, paths))  # the default: its own batch size and workers
        logger.info("repeat %d: torch forward %.2f  end-to-end %.2f  naive %.2f | onnx forward %s  default "
                    "end-to-end %.2f img/s", r, fwds[-1], e2es[-1], naives[-1],
                    f"{ofwds[-1]:.2f}" if ofwds else "-", de2es[-1])
    fwd, e2e, naive = statistics.median(fwds), statistics.median(e2es), statistics.median(naives)
    de2e = statistics.median(de2es)
    best_fwd = max(fwd, statistics.median(ofwds)) if ofwds else fwd
    result.update({"default_end_to_end_ips": de2e, "best_forward_ips": best_fwd,
                   "ratio_default_e2e_best_forward": de2e / best_fwd,
                   "ratio_default_e2e_torch_e2e": de2e / e2e})
    if ofwds:
        result.update({"onnx_forward_ips": statistics.median(ofwds), "onnx_forward_best_batch": onnx_bs,
                       "ratio_onnx_torch_forward": statistics.median(ofwds) / fwd})
    dev_scorer = Scorer(scorer.model, workers=args.workers, batch_size=fwd_bs, decode="device")
    e2e_dev = end_to_end_ips(dev_scorer, paths)
    result.update({"forward_ips": fwd, "forward_best_batch": fwd_bs, "end_to_end_ips": e2e, "naive_ips": naive,
                   "ratio_e2e_forward": e2e / fwd, "ratio_e2e_naive": e2e / naive,
                   "repeats": {"forward_ips": fwds, "end_to_end_ips": e2es, "naive_ips": naives,
                               "ratio_e2e_forward": [e / f for e, f in zip(e2es, fwds)],
                               "onnx_forward_ips": ofwds, "default_end_to_end_ips": de2es,
                               "ratio_default_e2e_onnx_forward": [e / f for e, f in zip(de2es, ofwds)]},
                   "end_to_end_device_decode_ips": e2e_dev, "ratio_device_decode_e2e": e2e_dev / e2e,
                   "n_end_to_end": args.n, "n_naive": args.naive_n})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))  # written now too: the RSS part below takes a while
    if not args.skip_rss:
        with tempfile.TemporaryDirectory() as tmp:
            small = str(_tiny_vit_folder(Path(tmp)))
            Scorer(small, workers=0)  # the default path's export, made here so the child only scores
            r500 = peak_rss(small, _images(args.images, 500), 32, workers)
            r5000 = peak_rss(small, _images(args.images, 5000), 32, workers)
        result.update({"rss_model": "small-vit (hidden 192, 4 layers, 224 px)",
                       "peak_rss_mb_500": r500["main_mb"], "peak_rss_mb_5000": r5000["main_mb"],
                       "peak_rss_worker_mb_500": r500["worker_mb"], "peak_rss_worker_mb_5000": r5000["worker_mb"]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()
                      if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
