"""``tastelab generate --base MODEL --lora CKPT_OR_DIR... --prompts PROMPTS --seeds 0,1,2,3 --out SAMPLES``.

Samples every LoRA checkpoint (and, with ``--include-base``, the base model) with diffusers into the judge's
one-folder-per-checkpoint layout plus ``SAMPLES/manifest.jsonl``; a re-run skips finished images. The
generation flags are shared with ``tastelab judge --generate`` (:func:`add_generation_flags`,
:func:`generation_config`). Torch and diffusers load inside the command, so ``tastelab --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tastelab.core.errors import UserError

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def parse_seeds(text: str) -> list[int]:
    """``0,1,2,3`` (or ``0-3``) -> seeds; a bad list is one line naming ``--seeds``."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                if int(hi) < int(lo):
                    raise ValueError
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise UserError(f"--seeds {text!r}: expected whole numbers like 0,1,2,3 or 0-3") from None
    return seeds


def add_generation_flags(p: argparse.ArgumentParser, *, base_required: bool, batch_flag: str) -> None:
    """The flags that say what to generate (``generate`` and ``judge --generate`` share them; the judge has its
    own ``--batch-size``, so the images-per-call flag is named by the caller)."""
    p.add_argument("--base", metavar="MODEL", required=base_required,
                   help="base pipeline: Hugging Face id, local diffusers folder, or one .safetensors/.ckpt file")
    p.add_argument("--lora", metavar="CKPT_OR_DIR", nargs="+", action="extend", default=[],
                   help="LoRA .safetensors files (kohya or diffusers keys) or folders of them (one checkpoint each)")
    p.add_argument("--seeds", default="0", help="seeds for prompts without --d, e.g. 0,1,2,3 or 0-3 "
                   "(default: %(default)s)")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default: %(default)s)")
    p.add_argument("--steps", type=int, help="sampling steps unless a prompt sets --s (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="guidance scale unless a prompt sets --l (default: the pipeline's)")
    p.add_argument("--width", type=int, help="image width unless a prompt sets --w (default: the pipeline's)")
    p.add_argument("--height", type=int, help="image height unless a prompt sets --h (default: the pipeline's)")
    p.add_argument("--scheduler", help="scheduler: euler, euler_a, ddim, dpm++2m, dpm++2m_karras, unipc, ... or a "
                   "diffusers class name (default: the pipeline's)")
    p.add_argument("--include-base", action="store_true", help="also sample the base model without LoRA ('base')")
    p.add_argument(batch_flag, type=int, default=1, dest="gen_batch_size",
                   help="images per pipeline call (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="auto: bf16 on GPUs that support it, else fp16; fp32 on the CPU (default: %(default)s)")
    p.add_argument("--attention-slicing", action="store_true", help="less GPU memory, slower")
    p.add_argument("--cpu-offload", action="store_true", help="model CPU offload for small GPUs")
    p.add_argument("--pipeline-class", help="diffusers pipeline class for a single-file --base (e.g. "
                   "StableDiffusionXLPipeline) when it cannot be inferred")
    p.add_argument("--single-file-config", metavar="ID_OR_DIR",
                   help="pipeline configs for a single-file --base (offline: a local diffusers folder)")


def generation_config(args: argparse.Namespace, *, prompts: str | None, out: str | Path, device: str) -> Any:
    """The :class:`GenerateConfig` the flags describe (pydantic errors become one line in cli.main)."""
    from tastelab.generate.config import GenerateConfig  # pydantic model only; no torch

    if not prompts:
        raise UserError("--prompts PROMPTS is required to generate samples")
    return GenerateConfig(
        base=args.base, loras=[Path(p) for p in args.lora], prompts=Path(prompts), seeds=parse_seeds(args.seeds),
        out=Path(out), lora_scale=args.lora_scale, include_base=args.include_base, steps=args.steps,
        guidance=args.guidance, width=args.width, height=args.height, scheduler=args.scheduler,
        batch_size=args.gen_batch_size, device=device, dtype=args.dtype, attention_slicing=args.attention_slicing,
        cpu_offload=args.cpu_offload, pipeline_class=args.pipeline_class, single_file_config=args.single_file_config,
        progress=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample every LoRA checkpoint with diffusers (the judge's layout + manifest)")
    add_generation_flags(p, base_required=True, batch_flag="--batch-size")
    p.add_argument("--prompts", required=True, metavar="PROMPTS",
                   help="prompt file: sd-scripts lines (--n --w --h --d --l --s), .toml, .json or .jsonl")
    p.add_argument("--out", required=True, metavar="SAMPLES", help="output folder (resumable)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tastelab.generate.run import generate_samples

    result = generate_samples(generation_config(args, prompts=args.prompts, out=args.out, device=args.device))
    print(f"{len(result.checkpoints)} checkpoint(s), {result.generated} image(s) generated, {result.skipped} "
          f"already there; manifest: {result.manifest}")
    return 0
