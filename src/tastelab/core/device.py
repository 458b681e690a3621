"""Device and dtype resolution: the one place that turns ``--device`` / ``train.device`` into a device.

Scoring, training, self-training, ensembles, feature extraction and sharded launches all accept the same
spellings (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``, other torch backends) and fail the same way: a
device this machine lacks is a one-line :class:`ValueError` naming it, raised before any model is loaded
(so ``--device cuda:7`` on a one-GPU machine is one clear line, not a traceback from the first forward).

Torch is imported inside the functions: the core layer stays importable without it.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["check_device", "resolve_device", "resolve_dtype"]

_DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                "fp16": "float16", "float16": "float16"}


def resolve_device(device: str | torch.device = "auto", *, option: str = "--device") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else must exist here (ValueError naming it).

    ``option`` is how the user spelled the setting (``--device``, ``train.device``): errors start with it.
    """
    import torch

    if str(device) != "auto":
        return check_device(device, option=option)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(device: str | torch.device, *, option: str = "--device") -> torch.device:
    """``device`` as a :class:`torch.device` that exists on this machine, or ValueError saying why not."""
    import torch

    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"{option} {device!r}: not a device name; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{option} {device}: no CUDA device on this machine; use {option} cpu (or auto)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{option} {device}: no such device; this machine has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1})")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"{option} {device}: MPS is not available on this machine; use {option} cpu (or auto)")
        return dev
    backend = getattr(torch, dev.type, None)  # xpu, npu, ...: their modules say whether they are usable
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise ValueError(f"{option} {device}: {dev.type} is not available on this machine; use auto, cpu, cuda or mps")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it, else fp16 on cuda/mps, fp32 on CPU."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
    return getattr(torch, _DTYPE_NAMES[dtype])


def accelerator_possible() -> bool:
    """Could ``device="auto"`` pick a GPU here? Answered without importing torch when the answer is no.

    PyTorch's ``auto`` picks CUDA (NVIDIA, or ROCm which torch calls cuda) or Apple's MPS. A Linux machine
    without the NVIDIA / AMD kernel devices, or a Mac that is not Apple silicon, has neither; anywhere else
    the caller asks torch.
    """
    torch = sys.modules.get("torch")
    if torch is not None:  # already paid for: ask it
        return resolve_device("auto").type != "cpu"
    if sys.platform.startswith("linux"):
        return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version",
                                               "/dev/kfd", "/dev/dxg"))
    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    return True
