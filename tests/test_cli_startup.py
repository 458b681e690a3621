"""The CLI starts without importing torch: ``--help``, ``--version`` and every ``COMMAND --help``.

Each case runs in a fresh interpreter (``sys.modules`` of this test process already holds torch) and
reports which heavy libraries the parse imported. torch and transformers take seconds to import; a
command imports them inside its run function, when it needs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "transformers", "torchvision", "onnxruntime", "onnx", "scipy", "pyarrow", "peft", "accelerate")

_PROBE = """
import json, sys
from tastelab.cli.main import build_parser, main
argv = json.loads(sys.argv[1])
if argv == ["--list"]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    print(json.dumps(sorted(sub.choices)))
    raise SystemExit(0)
try:
    main(argv)
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def _probe(argv: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argv), json.dumps(HEAVY)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


def _commands() -> list[str]:
    return json.loads(_probe(["--list"]))


def test_every_command_is_probed() -> None:
    # The parametrisation below is a fixed list (collection must not spawn processes); it must stay complete.
    assert sorted(_commands()) == sorted(COMMANDS)


COMMANDS = ["analyze", "compare", "convert", "ensemble", "export", "generate", "judge", "label", "merge", "models",
            "predict", "ratings", "score", "score-ray", "self-train", "train", "train-personal", "tune"]


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *([c, "--help"] for c in COMMANDS)],
                         ids=lambda a: " ".join(a))
def test_help_does_not_import_heavy_libraries(argv: list[str]) -> None:
    result = json.loads(_probe(argv))
    assert result["code"] == 0
    assert result["heavy"] == [], f"tastelab {' '.join(argv)} imported {result['heavy']}"


def test_python_dash_m_tastelab_runs_the_cli(tmp_path: Path) -> None:
    """``python -m tastelab`` is the console script: the package has a ``__main__`` (without one Python says
    "'tastelab' is a package and cannot be directly executed"), and user errors keep their exit code 2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    ok = subprocess.run([sys.executable, "-m", "tastelab", "--version"], env=env, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
    bad = subprocess.run([sys.executable, "-m", "tastelab", "ratings", str(tmp_path / "none.csv")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "none.csv" in bad.stderr, bad.stderr
