"""GPU check of ``tastelab generate``: bf16 (or fp16) generation on a real pipeline, on the first CUDA device.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python bench/generate_gpu_check.py [--base ID_OR_DIR] [--lora FILE]
        [--steps 20] [--size 512] [--json bench/results/generate_gpu_check.json]

Why: the test suite runs on the CPU in fp32 with a tiny random pipeline; this script proves the GPU path:
``dtype auto`` resolves to bf16 where the GPU supports it, the pixels are finite and not blank, the same
seed gives the same image in a second run, a LoRA changes the image, and it times images per second.
``--device cpu`` runs the same script on the CPU (fp32; the dtype checks then expect float32): a dry run of
the script itself on a machine without a GPU.

``--base``: a pipeline id or folder already in the local Hugging Face cache; without it the script takes the
first cached diffusers pipeline it finds (``huggingface_hub.scan_cache_dir``), and when none is cached it
falls back to the tiny random pipeline of the tests (reported as such: it proves the device/dtype plumbing,
not image quality). ``--lora``: a LoRA file for that base; without it a random PEFT-format LoRA is written for
the denoiser's attention projections. Exit 0 when every check passes, 1 otherwise; the measurements go to
``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cached_pipeline() -> str | None:
    """The first locally cached model repo that is a diffusers pipeline (has model_index.json), smallest first."""
    try:
        from huggingface_hub import scan_cache_dir

        repos = sorted((r for r in scan_cache_dir().repos if r.repo_type == "model"), key=lambda r: r.size_on_disk)
    except Exception:  # no cache folder at all
        return None
    for repo in repos:
        for rev in repo.revisions:
            if any(f.file_name == "model_index.json" for f in rev.files):
                return repo.repo_id
    return None


def random_lora(pipe_base: str, path: Path, strength: float = 0.05) -> Path:
    """A random PEFT-format LoRA for the denoiser's attention projections of ``pipe_base``."""
    import torch
    from safetensors.torch import save_file

    from tastelab.generate.pipeline import load_base

    base = load_base(pipe_base, device="cpu", dtype="fp32", attention_slicing=False, cpu_offload=False)
    prefix, denoiser = (("unet", base.pipe.unet) if getattr(base.pipe, "unet", None) is not None
                        else ("transformer", base.pipe.transformer))
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in denoiser.named_modules():
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") and isinstance(module, torch.nn.Linear):
            tensors[f"{prefix}.{name}.lora_A.weight"] = torch.randn(8, module.in_features, generator=g) * strength
            tensors[f"{prefix}.{name}.lora_B.weight"] = torch.randn(module.out_features, 8, generator=g) * strength
    save_file(tensors, str(path))
    return path


def pixels(path: Path):  # type: ignore[no-untyped-def]
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base")
    ap.add_argument("--lora", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run of this script")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "generate_gpu_check.json")
    args = ap.parse_args()

    import torch

    gpu = args.device != "cpu"
    if gpu and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    from tastelab.generate import GenerateConfig, generate_samples

    work = Path(tempfile.mkdtemp(prefix="generate_gpu_check-"))
    base, kind = args.base, "given"
    if base is None:
        base, kind = cached_pipeline(), "cached"
    if base is None:
        sys.path.insert(0, str(ROOT / "tests"))
        import tiny_diffusion

        base, kind = str(tiny_diffusion.save_tiny_sd(work / "tiny-pipe")), "tiny random (no real pipeline cached)"
        args.size = tiny_diffusion.SIZE
    lora = args.lora or random_lora(base, work / "random-lora-000001.safetensors")
    prompts = work / "prompts.txt"
    prompts.write_text("a photo of a red backpack on a beach\na watercolour painting of a lighthouse --n blurry\n")
    common = {"base": base, "prompts": prompts, "seeds": [0, 1], "steps": args.steps, "width": args.size,
              "height": args.size, "device": args.device, "dtype": "auto", "batch_size": 2}

    t0 = time.perf_counter()
    run = generate_samples(GenerateConfig(**common, loras=[lora], include_base=True, out=work / "a"))
    seconds = time.perf_counter() - t0
    generate_samples(GenerateConfig(**common, include_base=True, out=work / "b"))
    names = sorted(p.name for p in (work / "a" / "base").glob("*.png"))
    lora_dir = run.checkpoints[-1]
    base_px = [pixels(work / "a" / "base" / n) for n in names]
    checks = {
        "dtype_is_bf16_or_fp16": run.dtype in ("bfloat16", "float16") if gpu else run.dtype == "float32",
        "bf16_when_supported": (run.dtype == "bfloat16") == bool(torch.cuda.is_bf16_supported()) if gpu else True,
        "images_written": len(names) == 4 and run.generated == 8,
        "not_blank": all(float(p.std()) > 2.0 for p in base_px),
        "same_seed_same_image": max(float(abs(p - pixels(work / "b" / "base" / n)).max())
                                    for p, n in zip(base_px, names, strict=True)) <= 2.0,
        "lora_changes_image": min(float(abs(p - pixels(work / "a" / lora_dir / n)).mean())
                                  for p, n in zip(base_px, names, strict=True)) > 0.5,
    }
    report = {"base": base, "base_kind": kind, "lora": str(lora), "device": run.device,
              "gpu": torch.cuda.get_device_name(0) if gpu else None, "dtype": run.dtype, "steps": args.steps,
              "size": args.size,
              "images": run.generated, "seconds_incl_load": round(seconds, 2),
              "images_per_s_incl_load": round(run.generated / seconds, 3), "checks": checks,
              "passed": all(checks.values())}
    print(json.dumps(report, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
