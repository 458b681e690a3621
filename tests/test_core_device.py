"""Device and dtype resolution (tastelab.core.device): the one resolver scoring, training, self-training,
ensembles, extraction and sharded launches share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny
from tastelab.core.device import check_device, resolve_device, resolve_dtype
from tastelab.training.config import load_train_config

TINY = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "image_size": 16, "patch_size": 8}


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("an accelerator is present: auto does not pick the CPU")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


def test_resolve_dtype_rules(monkeypatch) -> None:
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", mps) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == torch.float16
    for name, dtype in [("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
                        ("bfloat16", torch.bfloat16), ("fp16", torch.float16), ("float16", torch.float16)]:
        assert resolve_dtype(name, cpu) == dtype
    assert resolve_dtype(torch.float64, cpu) == torch.float64
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", cpu)


def test_missing_devices_are_one_line_errors_naming_the_setting() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count > 7:
        pytest.skip("this machine has a cuda:7")
    for option in ("--device", "train.device"):
        with pytest.raises(ValueError, match=rf"^{option} cuda:7: no (such device|CUDA device)") as err:
            resolve_device("cuda:7", option=option)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not a device name"):
        check_device("gpu")
    if not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match=r"train\.device mps: MPS is not available"):
            resolve_device("mps", option="train.device")


def test_core_device_does_not_import_torch_at_import_time() -> None:
    """Its own imports stay torch-free (loaded by file: the package's __init__ is another module's business)."""
    import tastelab.core.device as mod

    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('d', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, mod.__file__], check=True)


def test_trainer_and_self_training_honour_the_resolver(monkeypatch, tmp_path: Path) -> None:
    """train.device goes through the resolver (self-training used to ignore mps and cuda:N)."""
    from tastelab import selftrain
    from tastelab.training import runtime, trainer

    seen: list[tuple[str, str]] = []

    def fake(device, *, option="--device"):
        seen.append((str(device), option))
        raise ValueError(f"{option} {device}: stop here")

    monkeypatch.setattr(runtime, "resolve_device", fake)  # the Trainer resolves through the shared runtime
    monkeypatch.setattr(selftrain, "resolve_device", fake)
    root = tiny.make_brightness_dataset(tmp_path / "data", 4)
    raw = {"data": {"format": "mos", "path": str(root / "labels.csv"), "image_root": str(root / "img"),
                    "score_range": [1, 5]},
           "model": {"name": "t", "backbone": {"kind": "hf", "name": "t", "hf_config": TINY},
                     "head": {"kind": "gaussian"}},
           "train": {"device": "mps", "cache_dir": str(tmp_path / "cache")}}
    cfg = load_train_config(raw=raw)
    with pytest.raises(ValueError, match=r"train\.device mps: stop here"):
        trainer.Trainer(cfg, tmp_path / "run").fit()
    with pytest.raises(ValueError, match=r"train\.device mps: stop here"):
        selftrain.self_train(cfg, [str(p) for p in (root / "img").iterdir()], tmp_path / "st", rounds=1)
    assert seen == [("mps", "train.device"), ("mps", "train.device")]
