"""The diffusers side: load the base pipeline once, swap one LoRA adapter at a time, run a batch.

Why these rules: the base folder, checkpoint file and LoRA files are untrusted input, so nothing in them can
switch on code (``trust_remote_code=False``, no ``custom_pipeline``; a local folder's ``model_index.json`` may
name only diffusers / transformers classes); every checkpoint is sampled from the same base weights (loaded
once; the adapter is unloaded after each checkpoint, so B never sees A); and a user's mistake (a missing
offline model, a LoRA trained for another base) is one :class:`UserError` naming it, never a traceback.
Torch and diffusers are imported inside the functions (``tastelab --help`` stays light).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tastelab.core.errors import UserError, one_line

__all__ = ["ADAPTER", "BasePipeline", "NonFiniteLatents", "load_base"]

log = logging.getLogger(__name__)

ADAPTER = "tastelab_ckpt"  # one adapter at a time, always under this name
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_ALLOWED_LIBRARIES = frozenset({"diffusers", "transformers", None})
# diffusers' single-file model types -> the text-to-image pipeline class that loads them.
_SINGLE_FILE_CLASSES: tuple[tuple[str, str], ...] = (
    ("v1", "StableDiffusionPipeline"), ("v2", "StableDiffusionPipeline"),
    ("xl_base", "StableDiffusionXLPipeline"), ("playground-v2-5", "StableDiffusionXLPipeline"),
    ("sd3", "StableDiffusion3Pipeline"), ("sd35", "StableDiffusion3Pipeline"),
    ("flux-dev", "FluxPipeline"), ("flux-schnell", "FluxPipeline"),
)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence libraries' own error logging while their exception is turned into our one-line error."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _missing_model(base: str, exc: BaseException) -> UserError:
    if _offline():
        return UserError(f"--base {base}: not a local folder or file and not in the Hugging Face cache "
                         "(HF_HUB_OFFLINE=1: nothing is downloaded)")
    return UserError(f"--base {base}: could not be loaded ({one_line(str(exc))[:300]})")


def _check_model_index(folder: Path) -> None:
    """A local pipeline folder may name only diffusers / transformers classes (no custom code)."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise UserError(f"--base {folder}: not a diffusers pipeline folder (no model_index.json)")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{index}: not readable JSON ({one_line(str(exc))})") from None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise UserError(f"{index}: no pipeline _class_name")
    import diffusers  # heavy: torch + diffusers

    if not isinstance(getattr(diffusers, data["_class_name"], None), type):
        raise UserError(f"{index}: {data['_class_name']!r} is not a diffusers pipeline (custom code is not run)")
    for key, value in data.items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        if value[0] not in _ALLOWED_LIBRARIES:
            raise UserError(f"{index}: component {key!r} comes from {value[0]!r}; only diffusers and transformers "
                            "components are loaded")


class _LazyTensors(Mapping[str, Any]):
    """A safetensors file as a read-only mapping that loads a tensor only when it is looked at (model-type
    inference reads a few shapes; loading a 7 GB checkpoint twice would not fit small machines)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())
        self._set = set(self._keys)

    def __getitem__(self, key: str) -> Any:
        if key not in self._set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _pipeline_class(name: str) -> Any:
    import diffusers

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise UserError(f"--pipeline-class {name}: not a diffusers pipeline class")
    return cls


def _single_file_class(path: Path) -> Any:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        if path.suffix.lower() == ".safetensors":
            kind = infer_diffusers_model_type(_LazyTensors(path))
        else:
            from diffusers.loaders.single_file_utils import load_single_file_checkpoint  # torch.load weights_only

            kind = infer_diffusers_model_type(load_single_file_checkpoint(str(path)))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise UserError(f"--base {path}: not a readable checkpoint ({one_line(str(exc))[:200]})") from None
    for prefix, cls in _SINGLE_FILE_CLASSES:
        if kind == prefix or kind.startswith(prefix + "_") or kind.startswith(prefix + "-"):
            return _pipeline_class(cls)
    raise UserError(f"--base {path}: a {kind!r} checkpoint; name its text-to-image pipeline with --pipeline-class")


def _dtype_keyword() -> str:
    """diffusers >= 0.36 names the loading dtype ``dtype`` (``torch_dtype`` is deprecated); older ones only
    know ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def _load(base: str, *, dtype: Any, pipeline_class: str | None, single_file_config: str | None) -> Any:
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    path = Path(base).expanduser()
    common = {_dtype_keyword(): dtype}
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"--base {base}: a single checkpoint file must be .safetensors or .ckpt")
        cls = _pipeline_class(pipeline_class) if pipeline_class else _single_file_class(path)
        kwargs = {**common, **({"config": single_file_config} if single_file_config else {})}
        try:
            return cls.from_single_file(str(path), **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"--base {base}: {cls.__name__}.from_single_file failed ({one_line(str(exc))[:300]}); "
                            "with HF_HUB_OFFLINE its configs must be cached or given with --single-file-config"
                            ) from None
    if path.is_dir():
        _check_model_index(path)
        source = str(path)
    elif base.startswith((".", "/", "~")) or base.count("/") > 1 or "\\" in base:  # a path, not owner/name
        raise UserError(f"--base {base}: no such file or folder")
    else:
        source = base
    try:
        if pipeline_class:
            return _pipeline_class(pipeline_class).from_pretrained(source, trust_remote_code=False, **common)
        try:
            return AutoPipelineForText2Image.from_pretrained(source, trust_remote_code=False, **common)
        except ValueError as exc:
            if "AutoPipeline" not in str(exc) and "can't find a pipeline" not in str(exc).lower():
                raise
            return DiffusionPipeline.from_pretrained(source, trust_remote_code=False, **common)
    except OSError as exc:
        raise _missing_model(base, exc) from None


@dataclass
class BasePipeline:
    """A loaded base pipeline and what its ``__call__`` accepts (so one call shape fits SD, SDXL, Flux...)."""

    pipe: Any
    base: str
    device: Any
    dtype: Any
    params: Mapping[str, inspect.Parameter]

    def __post_init__(self) -> None:
        self._default_scheduler = self.pipe.scheduler
        self.scale: float | None = None  # a LoRA scale passed per call (pipelines without set_adapters)

    def default(self, name: str) -> Any:
        """The pipeline's own default for a call argument (recorded in the manifest when the user sets none)."""
        param = self.params.get(name)
        return None if param is None or param.default is inspect.Parameter.empty else param.default

    def default_size(self) -> tuple[int, int]:
        """The pipeline's default (width, height): its sample size times the VAE scale factor."""
        scale = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        size = getattr(self.pipe, "default_sample_size", None)
        if size is None:
            denoiser = getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer", None)
            size = getattr(getattr(denoiser, "config", None), "sample_size", None) or 64
        if isinstance(size, list | tuple):
            size = size[0]
        return int(size) * scale, int(size) * scale

    @property
    def generator_device(self) -> Any:
        """Where the seeded generators live: the device the pipeline runs on (offload included)."""
        return getattr(self.pipe, "_execution_device", self.device)

    # ------------------------------------------------------------------------------------------- LoRA
    def load_lora(self, file: Path, scale: float) -> None:
        """Load one LoRA file (kohya or diffusers/PEFT keys) as the active adapter at ``scale``."""
        try:
            with _quiet("diffusers", "peft"):  # their multi-line error log would repeat what we raise, once
                self.pipe.load_lora_weights(str(file), adapter_name=ADAPTER)
        except (ValueError, RuntimeError, KeyError, TypeError, OSError, AttributeError) as exc:
            self.unload_lora()
            reason = one_line(str(exc)).split("; size mismatch")[0][:200]
            raise UserError(f"--lora {file}: does not match the base model {self.base} ({reason})") from None
        adapters = self.pipe.get_list_adapters() if hasattr(self.pipe, "get_list_adapters") else {}
        if not any(ADAPTER in names for names in adapters.values()):
            self.unload_lora()
            raise UserError(f"--lora {file}: does not match the base model {self.base} (none of its keys names a "
                            "layer of the base)")
        self.scale = scale
        if hasattr(self.pipe, "set_adapters"):
            self.pipe.set_adapters([ADAPTER], adapter_weights=[scale])
            self.scale = None  # applied to the adapter; no call argument needed

    def unload_lora(self) -> None:
        """Remove every LoRA layer: the next checkpoint starts from the untouched base weights."""
        if hasattr(self.pipe, "unload_lora_weights"):
            self.pipe.unload_lora_weights()
        self.scale = None

    # ------------------------------------------------------------------------------------------- calls
    def set_scheduler(self, name: str | None) -> str:
        """Use the named scheduler (``None``: the base's own); returns the scheduler's class name."""
        from tastelab.generate.schedulers import make_scheduler

        self.pipe.scheduler = (self._default_scheduler if name is None
                               else make_scheduler(name, self._default_scheduler))
        return type(self.pipe.scheduler).__name__

    def __call__(self, prompts: Sequence[str], negatives: Sequence[str | None], seeds: Sequence[int], *,
                 width: int, height: int, steps: int, guidance: float) -> Any:
        """One batch -> float images ``(B, H, W, C)`` in 0..1 as a NumPy array (NaN where the model failed)."""
        import torch

        gen_device = self.generator_device
        kwargs: dict[str, Any] = {
            "prompt": list(prompts), "num_inference_steps": steps, "guidance_scale": guidance,
            "width": width, "height": height, "output_type": "np",
            "generator": [torch.Generator(device=gen_device).manual_seed(int(s)) for s in seeds],
        }
        if any(n for n in negatives):
            if "negative_prompt" not in self.params:
                raise UserError(f"--base {self.base}: {type(self.pipe).__name__} takes no negative prompt (--n)")
            kwargs["negative_prompt"] = [n or "" for n in negatives]
        if "num_images_per_prompt" in self.params:
            kwargs["num_images_per_prompt"] = 1
        if self.scale is not None:  # older LoRA mixins: the scale travels with the call
            for name in ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs"):
                if name in self.params:
                    kwargs[name] = {"scale": self.scale}
                    break
        if "callback_on_step_end" in self.params and "latents" in getattr(self.pipe, "_callback_tensor_inputs", ()):
            kwargs["callback_on_step_end"] = _check_latents
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        with torch.inference_mode():
            return self.pipe(**kwargs).images


class NonFiniteLatents(RuntimeError):
    """Latents became NaN/inf during sampling; ``rows`` are the batch positions affected, ``step`` the step."""

    def __init__(self, rows: list[int], step: int) -> None:
        self.rows, self.step = rows, step
        super().__init__(f"non-finite latents at step {step} for batch rows {rows}")


def _check_latents(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
    """Stop at the first step whose latents are not finite (instead of sampling NaNs to the end)."""
    latents = tensors["latents"]
    finite = latents.reshape(latents.shape[0], -1).isfinite().all(dim=1)
    if not bool(finite.all()):
        raise NonFiniteLatents([int(i) for i in (~finite).nonzero().flatten().tolist()], step)
    return tensors


def load_base(base: str, *, device: str, dtype: str, attention_slicing: bool, cpu_offload: bool,
              pipeline_class: str | None = None, single_file_config: str | None = None) -> BasePipeline:
    """Load ``base`` (hub id, local folder, or one checkpoint file) on ``device`` in ``dtype`` (``auto``:
    bf16 on GPUs that support it, else fp16 on CUDA / MPS; fp32 on the CPU)."""
    from tastelab.core.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    pipe = _load(base, dtype=torch_dtype, pipeline_class=pipeline_class, single_file_config=single_file_config)
    if not hasattr(pipe, "load_lora_weights"):
        log.warning("%s cannot load LoRA weights; only the base can be sampled", type(pipe).__name__)
    if cpu_offload and dev.type != "cpu":
        pipe.enable_model_cpu_offload(device=dev)
    else:
        pipe.to(dev)
    if attention_slicing:
        pipe.enable_attention_slicing()
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # tastelab's own bar counts images across checkpoints
    params = inspect.signature(pipe.__call__).parameters
    return BasePipeline(pipe=pipe, base=base, device=dev, dtype=torch_dtype, params=params)
