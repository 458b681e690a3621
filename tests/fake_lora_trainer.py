"""A fake LoRA trainer for the ``tune --external`` tests (run as ``sys.executable fake_lora_trainer.py ...``).

It "trains" for ``--epochs`` epochs and after each one writes either kohya-style sample images
(``--mode samples``: ``OUT/sample/lora_e{E:06d}_{idx:02d}_{time}_{seed}.png``) or a checkpoint
(``--mode checkpoints``: ``OUT/lora-{E:06d}.safetensors``, then the final ``OUT/lora.safetensors``), written
in small chunks with pauses so a watcher can catch it half-written. The quality is known: images get closer
to the references' colour (judge_fakes.REF_COLOUR) the closer ``--lr`` is to 1e-4 and the later the epoch;
a checkpoint file carries that quality in its JSON header for the fake generator. ``--mode lora --base PIPE``
writes real kohya-format LoRA files for the tiny pipeline in PIPE (tests/tiny_diffusion.py's writer; the same
names), for the real generator (tastelab.generate); their strength shrinks with the epoch and with ``badness``.

``--child`` starts a child process in the same process group (as a launcher's workers would be) and writes
both pids to ``OUT/pids.txt``; ``--record-env`` writes the environment to ``OUT/env.json``; ``--fail-after K``
exits with code 3 after K epochs (``--fail-after 0``: before any); ``--ignore-term`` ignores SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REF_COLOUR = (200, 120, 60)


def badness(lr: float, dim: int = 32) -> float:
    return abs(math.log10(lr) - math.log10(1e-4)) + abs(dim - 32) / 320


def colour(lr: float, dim: int, epoch: int, prompt: int, seed: int) -> tuple[int, int, int]:
    off = int(min(150.0, 10 + 300 * badness(lr, dim)) / epoch)
    return (max(0, REF_COLOUR[0] - off - 3 * seed), min(255, REF_COLOUR[1] + off // 2 + 7 * prompt),
            min(255, REF_COLOUR[2] + off))


def picture(rgb: tuple[int, int, int], shift: int):  # type: ignore[no-untyped-def]
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64), rgb)
    ImageDraw.Draw(img).ellipse((10 + shift, 10, 50 + shift, 50), fill=(rgb[2], rgb[0], rgb[1]))
    return img


def slow_write(path: Path, data: bytes, chunks: int, pause: float) -> None:
    size = math.ceil(len(data) / chunks)
    with path.open("wb") as fh:
        for i in range(0, len(data), size):
            fh.write(data[i:i + size])
            fh.flush()
            time.sleep(pause)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--optimizer", default="AdamW")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=["samples", "checkpoints", "lora"], default="samples")
    ap.add_argument("--base", help="--mode lora: the tiny pipeline folder the LoRA files are made for")
    ap.add_argument("--sleep", type=float, default=0.2)
    ap.add_argument("--chunks", type=int, default=1)
    ap.add_argument("--chunk-pause", type=float, default=0.0)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--fail-after", type=int)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--record-env", action="store_true")
    ap.add_argument("--ignore-term", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(f"fake trainer: lr={args.lr} dim={args.dim} epochs={args.epochs} optimizer={args.optimizer}", flush=True)
    if args.record_env:
        (out / "env.json").write_text(json.dumps(dict(os.environ)))
    if args.child:
        child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.1)"])
        (out / "pids.txt").write_text(f"{os.getpid()} {child.pid}")
    for epoch in range(1, args.epochs + 1):
        if args.fail_after is not None and epoch > args.fail_after:
            print("CUDA out of memory (fake)", file=sys.stderr, flush=True)
            return 3
        time.sleep(args.sleep)
        print(f"epoch {epoch} done", flush=True)
        if args.mode == "samples":
            folder = out / "sample"
            folder.mkdir(exist_ok=True)
            for p in range(args.prompts):
                for s in range(2):
                    img = picture(colour(args.lr, args.dim, epoch, p, s + args.seed % 3), 6 * s + 3 * p)
                    img.save(folder / f"lora_e{epoch:06d}_{p:02d}_20260101{epoch:02d}{p:02d}{s:02d}_{100 + s}.png")
        elif args.mode == "lora":
            from tiny_diffusion import write_kohya_lora  # this script's folder is on sys.path

            name = f"lora-{epoch:06d}.safetensors" if epoch < args.epochs else "lora.safetensors"
            strength = 0.05 + 0.2 * min(1.0, badness(args.lr, args.dim)) / epoch
            write_kohya_lora(Path(args.base), out / name, seed=epoch + 100 * args.seed, strength=strength)
        else:
            header = json.dumps({"lr": args.lr, "dim": args.dim, "epoch": epoch, "seed": args.seed}).encode()
            data = len(header).to_bytes(8, "little") + header + b"\0" * 4096
            name = f"lora-{epoch:06d}.safetensors" if epoch < args.epochs else "lora.safetensors"
            slow_write(out / name, data, args.chunks, args.chunk_pause)
    return 0


if __name__ == "__main__":
    sys.exit(main())
