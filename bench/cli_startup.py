"""Cold-start time of the CLI: ``--help``, ``score --help`` and scoring one image, as ratios to ``python -c pass``.

    python bench/cli_startup.py --runs 7 --out bench/results/cli_startup.json

Each command runs ``--runs`` times in a fresh interpreter, the commands interleaved round by round (a
neighbour's burst on a shared machine then lands in one round, not on one command), and the median wall
time is reported with its ratio to an empty interpreter start (``python -c pass``). ``tastelab`` is run as
``python -m tastelab.cli.main`` (what the console script calls) with ``--src`` first on ``PYTHONPATH``, so
another checkout can be measured the same way (``--src ../other/src``).

Scoring one image is measured on both paths: ``--backend torch`` (imports torch, builds the PyTorch model)
and the default on a CPU (ONNX Runtime through the cached export, no torch). The default path's cache is a
fresh temporary folder, filled by one untimed first run whose time (the one-off export) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _time(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="rounds; every command runs once per round")
    ap.add_argument("--image", type=Path, default=ROOT / "examples" / "images" / "astronaut.jpg")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="the tastelab source tree to measure")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cli_startup.json")
    args = ap.parse_args()

    py = sys.executable
    tl = [py, "-m", "tastelab.cli.main"]
    commands = {
        "python -c pass": [py, "-c", "pass"],
        "tastelab --help": [*tl, "--help"],
        "tastelab score --help": [*tl, "score", "--help"],
        "tastelab score IMAGE --backend torch": [*tl, "-q", "score", "--backend", "torch", str(args.image)],
        "tastelab score IMAGE (default: cached ONNX)": [*tl, "-q", "score", str(args.image)],
    }
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TASTELAB_AUTO_ONNX"}
        env.update({"PYTHONPATH": os.pathsep.join([str(args.src.resolve()), env.get("PYTHONPATH", "")]),
                    "TASTELAB_CACHE": cache, "HF_HUB_OFFLINE": "1"})
        first = _time(commands["tastelab score IMAGE (default: cached ONNX)"], env)  # exports into the cache
        times: dict[str, list[float]] = {name: [] for name in commands}
        for r in range(args.runs):
            for name, argv in commands.items():
                times[name].append(_time(argv, env))
            print(f"round {r + 1}/{args.runs}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()),
                  file=sys.stderr)
    base = statistics.median(times["python -c pass"])
    result = {
        "command": "python bench/cli_startup.py " + " ".join(sys.argv[1:]),
        "runs": args.runs,
        "image": args.image.name,
        "first_default_score_s": first,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "results": {name: {"median_s": statistics.median(t), "ratio_to_python": statistics.median(t) / base,
                           "runs_s": t} for name, t in times.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, commands))
    print(f"{'command':<{width}}  median s  x python -c pass")
    for name, res in result["results"].items():
        print(f"{name:<{width}}  {res['median_s']:8.3f}  {res['ratio_to_python']:6.1f}")
    print(f"first default score (exports the model once): {first:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
