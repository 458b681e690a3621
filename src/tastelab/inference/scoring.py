"""Scoring: one image, a batch, or a stream of millions of files, resumable.

Decoding and resizing run in DataLoader worker processes and cross process boundaries as uint8
tensors (4x smaller than float); normalisation happens on the model's device; the model runs under
``torch.inference_mode`` with autocast on accelerators. A bad file becomes an error record, the run
goes on. The forward call is the only part that depends on the runtime: a model folder exported to
ONNX (``model.onnx``) runs with ONNX Runtime through the same decoding, normalisation and result
mapping (``backend="onnx"``, chosen automatically for such folders).

On a CPU, ``backend="auto"`` scores a PyTorch model folder through an ONNX export of it, made once and
cached per model content hash (:mod:`tastelab.inference.onnx_cache`): ONNX Runtime runs the default model
about twice as fast as PyTorch eager there. That path decodes with Pillow into NumPy arrays
(:mod:`tastelab.io.batches`) and never imports torch, so this module imports torch only where the PyTorch
backend needs it. Results (and the model identity recorded in output rows) are the same on both paths.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from PIL import Image

from tastelab.core.device import accelerator_possible, check_device, resolve_device, resolve_dtype  # one home
from tastelab.io.batches import default_workers, iter_array_batches
from tastelab.io.images import ImageDecodeError, load_image, normalize_array, preprocess_to_array
from tastelab.io.urls import DEFAULT_URL_TIMEOUT, is_url, read_url
from tastelab.models.config import QUALITY_BANDS, ModelConfig
from tastelab.models.folder import unit_scale
from tastelab.models.identity import ModelIdentity

if TYPE_CHECKING:
    import torch

    from tastelab.inference.onnx_runtime import OnnxModel
    from tastelab.io.loader import Batch
    from tastelab.models import TasteModel
    from tastelab.models.ensemble import EnsembleModel
    from tastelab.models.heads import HeadOutput

logger = logging.getLogger(__name__)

#: Default rating bands on the 1..10 scale, highest first: (lower bound, name); a model's own
#: ``config.bands`` replaces them (null: no bands).
BANDS: tuple[tuple[float, str], ...] = QUALITY_BANDS[:-1]
LOWEST_BAND = QUALITY_BANDS[-1][1]


def rating_band(score_1_10: float, bands: Sequence[Sequence[Any]] | None = QUALITY_BANDS) -> str | None:
    """The band of a score on the 1..10 scale: the first label whose lower bound it reaches (highest first).

    ``bands`` is a model's ``config.bands``; None (a model without bands), NaN, or a score below every
    bound gives None, except that a last bound at the bottom of the scale (1) also takes scores below it."""
    bands = list(bands or ())
    for bound, name in bands:
        if score_1_10 >= bound:
            return str(name)
    if bands and bands[-1][0] <= 1.0 and score_1_10 < bands[-1][0]:  # NaN compares False: no band
        return str(bands[-1][1])
    return None


@dataclass
class ScoreResult:
    """One image's prediction (or the reason it has none)."""

    path: str | None
    score: float | None = None  # 1..10
    raw_score: float | None = None  # the model's native label scale (e.g. MOS 0..1)
    band: str | None = None
    distribution: list[float] | None = None
    uncertainty: float | None = None  # standard deviation on the 1..10 scale
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ArrayOutput:
    """A head's outputs as NumPy arrays (native scale): what ONNX Runtime returns, named like HeadOutput."""

    score: np.ndarray  # (B,)
    probs: np.ndarray | None = None  # (B, K)
    var: np.ndarray | None = None  # (B,)


def _as_array(x: Any) -> np.ndarray | None:
    """A tensor (any device / dtype) or array -> float32 NumPy; None stays None."""
    if x is None:
        return None
    if hasattr(x, "detach"):  # a torch tensor: bf16 / fp16 / CUDA included
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def resolve_backend(model: object, backend: str = "auto") -> str:
    """``torch`` or ``onnx``: the runtime a model argument is made for; ``auto`` lets a folder's content decide.

    ``auto`` picks ONNX Runtime for a folder with ``model.onnx`` and no ``model.safetensors`` (what
    ``tastelab export`` writes), PyTorch otherwise: the PyTorch weights stay the reference when both exist.
    (On a CPU the :class:`Scorer` then runs a PyTorch folder through its cached ONNX export, see
    :func:`cpu_onnx_reason`.)
    """
    from tastelab.inference import BACKENDS
    from tastelab.inference.onnx_runtime import OnnxModel, is_onnx_folder
    from tastelab.models.folder import WEIGHTS_FILE

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    torch = sys.modules.get("torch")  # an nn.Module exists only if torch is loaded: no import needed
    if torch is not None and isinstance(model, torch.nn.Module):  # a TasteModel, or an EnsembleModel (same interface)
        if backend == "onnx":
            raise ValueError("backend='onnx' needs an exported folder: tastelab.inference.onnx.export_onnx(model, DIR)")
        return "torch"
    if isinstance(model, OnnxModel):
        if backend == "torch":
            raise ValueError("backend='torch' cannot run an OnnxModel; pass the PyTorch model folder")
        return "onnx"
    if backend != "auto":
        return backend
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a TasteModel, an OnnxModel, a folder or a preset name, not {type(model)}")
    folder = Path(os.fspath(model))
    return "onnx" if is_onnx_folder(folder) and not (folder / WEIGHTS_FILE).is_file() else "torch"


def default_batch_size(device: str | torch.device, size: int, backend: str = "torch") -> int:
    """Batch size that keeps the model busy without thrashing caches.

    On a CPU, large batches of large inputs run *slower* per image in PyTorch eager (measured:
    MobileNetV2 at 512 px on 2 cores does 8-9 img/s at batch 1-2 and 4 img/s at batch 8), so aim for
    about 0.4 megapixels per batch there. ONNX Runtime on a CPU does best with 1-2 images of 512 px
    (measured on 2 cores: 28 img/s at batch 1 and 2, 25 at 4 and 8), so it gets about 0.5 MP per batch
    (2 at 512 px); accelerators want big batches.
    """
    if getattr(device, "type", device) == "cpu":
        pixels = 1 << 19 if backend == "onnx" else 400_000
        return max(1, min(32, pixels // (size * size)))
    return 64


def cpu_onnx_reason(model: object, *, backend: str, device: str, dtype: object, compile: bool,
                    decode: str, loading_rules: bool = False) -> str | None:
    """Why the Scorer must not swap a PyTorch folder for its cached ONNX export (None: it may).

    Only with ``backend="auto"``, for a folder or preset (not an in-memory model), on a CPU, in float32,
    without ``compile`` or ``decode="device"`` (PyTorch features), and when onnxruntime is installed and
    ``TASTELAB_AUTO_ONNX`` does not turn it off.
    """
    from tastelab.inference.onnx_cache import auto_onnx_available

    if backend != "auto":
        return f"backend={backend!r}"
    if not isinstance(model, (str, os.PathLike)):
        return "an in-memory model"
    if str(dtype) not in ("auto", "fp32", "float32", "torch.float32"):
        return f"dtype {dtype}"
    if compile:
        return "compile=True"
    if loading_rules:  # the export loads the folder under the default (strict) rules: keep one loading path
        return "trust_remote_code / allow_external_weights"
    if decode != "cpu":
        return f"decode={decode!r}"
    ok, why = auto_onnx_available()
    if not ok:
        return why
    if str(device) == "cpu":
        return None
    if str(device) != "auto":
        return f"device {device}"
    if accelerator_possible() and resolve_device("auto").type != "cpu":
        return "an accelerator is available"
    return None


class Scorer:
    """Batched, streamed predictions from a model folder or preset, with PyTorch or ONNX Runtime.

    ``backend="auto"`` runs an exported folder with ONNX Runtime, and on a CPU also a PyTorch folder, via
    its ONNX export cached per model content hash (made and verified on first use; PyTorch when that is
    impossible, said in one log line). ``backend="torch"`` always runs PyTorch.

    >>> scorer = Scorer("default")              # doctest: +SKIP
    >>> scorer.predict("photo.jpg").score        # doctest: +SKIP
    >>> Scorer("exported/", backend="onnx")      # doctest: +SKIP
    """

    def __init__(self, model: TasteModel | EnsembleModel | OnnxModel | str | os.PathLike = "default", *,
                 backend: str = "auto",
                 device: str = "auto", dtype: str | torch.dtype = "auto", batch_size: int | None = None,
                 workers: int | None = None, channels_last: bool = True, compile: bool = False,
                 max_pixels: int | None = 178_956_970, allow_urls: bool = False,
                 url_timeout: float = DEFAULT_URL_TIMEOUT, decode: str = "cpu", trust_remote_code: bool = False,
                 allow_external_weights: bool = False) -> None:
        if decode not in ("cpu", "device"):
            raise ValueError(f"decode must be 'cpu' (Pillow in workers) or 'device' (JPEGs on the model's "
                             f"device, nvJPEG on CUDA), not {decode!r}")
        self.decode = decode
        self.model: TasteModel | EnsembleModel | OnnxModel
        self.backend = resolve_backend(model, backend)
        if self.backend == "torch" and str(device) not in ("auto", "cpu"):
            check_device(device)  # before any model is loaded: a wrong device is a one-line error
        #: The folder the model came from (None for an in-memory model): what :attr:`identity` hashes.
        self.model_folder: Path | None = _model_folder(model)
        self._identity: ModelIdentity | None = None
        self._folder_hash: str | None = None
        self._batch_size = batch_size
        self._workers = workers
        self.max_pixels = max_pixels
        self.allow_urls = allow_urls
        self.url_timeout = url_timeout
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        #: The cached ONNX export this Scorer runs instead of the PyTorch folder (None: it does not).
        self.onnx_export: Path | None = None
        cached: OnnxModel | None = None
        if self.backend == "torch" and self.model_folder is not None:
            found = self._cached_export(model, backend=backend, device=device, dtype=dtype,
                                        compile=compile, decode=decode,
                                        loading_rules=trust_remote_code or allow_external_weights)
            if found is not None:
                self.onnx_export, cached = found
        if self.backend == "onnx" or cached is not None:
            from tastelab.inference.onnx_runtime import OnnxModel

            self.backend = "onnx"
            # model.onnx is float32 and ORT takes host arrays: normalise on the CPU in fp32 (the cached
            # export was loaded on the CPU, under the cache's use lock).
            self.model = cached if cached is not None else model if isinstance(model, OnnxModel) else OnnxModel(
                model, device=device)  # type: ignore[arg-type]
            self._device_type = "cpu"
            if dtype not in ("auto", "fp32", "float32") and str(dtype) != "torch.float32":
                logger.warning("dtype %s ignored: the ONNX backend runs the exported float32 graph", dtype)
            self._forward: Any = self._onnx_forward
            return
        import torch

        from tastelab.inference.onnx_runtime import OnnxModel  # torch-free; resolve_backend imported it
        from tastelab.models import load_model

        assert not isinstance(model, OnnxModel)  # resolve_backend: an OnnxModel runs on the onnx backend
        torch_model = model if isinstance(model, torch.nn.Module) else load_model(
            model, trust_remote_code=trust_remote_code, allow_external_weights=allow_external_weights)
        self.model = torch_model
        self._device = resolve_device(device)
        self._device_type = self._device.type
        self._dtype = resolve_dtype(dtype, self._device)
        torch_model.eval().to(self._device)
        if channels_last and self._device.type != "mps":
            torch_model.to(memory_format=torch.channels_last)
        self._forward = torch.compile(torch_model) if compile else torch_model

    def _cached_export(self, model: object, **choice: Any) -> tuple[Path, OnnxModel] | None:
        """The cached ONNX export to run instead of PyTorch, loaded, or None (with why in the log)."""
        why = cpu_onnx_reason(model, **choice)
        if why is not None:
            logger.debug("PyTorch backend (no cached ONNX export: %s)", why)
            return None
        from tastelab.inference.onnx_cache import CachedExportError, load_cached_onnx
        from tastelab.inference.onnx_runtime import OnnxModel

        try:
            return load_cached_onnx(self.model_folder, self.folder_hash,  # type: ignore[arg-type]
                                    lambda entry: OnnxModel(entry, device="cpu"), name=str(model))
        except CachedExportError as exc:
            log = logger.info if exc.remembered else logger.warning
            log("scoring %s with PyTorch: no ONNX export (%s)", model, exc)
            return None

    @property
    def folder_hash(self) -> str:
        """Content hash of :attr:`model_folder` (computed once): the identity and the ONNX cache key."""
        if self._folder_hash is None:
            from tastelab.models.identity import folder_hash

            self._folder_hash = folder_hash(self.model_folder)  # type: ignore[arg-type]
        return self._folder_hash

    @property
    def identity(self) -> ModelIdentity:
        """Name and content hash of the model, recorded in every output row (computed once).

        A cached ONNX export reports the PyTorch folder it was made from: same model, same rows."""
        if self._identity is None:
            from tastelab.models.identity import module_hash

            digest = self.folder_hash if self.model_folder is not None else module_hash(self.model)
            self._identity = ModelIdentity(self.config.name, digest)
        return self._identity

    @property
    def device(self) -> torch.device:
        """The torch device inputs go to (the CPU for ONNX Runtime; torch is imported on first access)."""
        if self._device is None:
            import torch

            self._device = torch.device(self._device_type)
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (float32 for ONNX Runtime; torch is imported on first access)."""
        if self._dtype is None:
            import torch

            self._dtype = torch.float32
        return self._dtype

    @property
    def workers(self) -> int:
        """Decode processes; ``None`` at construction means :func:`default_workers` for the device."""
        if self._workers is None:
            self._workers = default_workers(self._device_type)
        return self._workers

    @workers.setter
    def workers(self, value: int) -> None:
        self._workers = value

    @property
    def batch_size(self) -> int:
        """Images per forward pass; ``None`` at construction means :func:`default_batch_size`."""
        if self._batch_size is None:
            self._batch_size = default_batch_size(self._device_type, self.model.preprocess.size, self.backend)
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = value

    @property
    def config(self) -> ModelConfig:
        """The model folder's description (same for both backends)."""
        return self.model.config

    # -- core -------------------------------------------------------------------------------
    def _onnx_forward(self, x: np.ndarray) -> ArrayOutput:
        out = cast("OnnxModel", self.model).run(x)  # only set as _forward for the onnx backend
        return ArrayOutput(score=out["score"], probs=out.get("probs"), var=out.get("variance"))

    def _run(self, batch_uint8: Any) -> ArrayOutput | HeadOutput:
        """uint8 ``(B, 3, S, S)`` (a tensor, or for ONNX Runtime also an array) -> the head's outputs."""
        pre = self.model.preprocess
        if self.backend == "onnx":
            return self._forward(normalize_array(np.asarray(batch_uint8), pre.mean, pre.std))
        import torch

        from tastelab.io.images import normalize_batch

        with torch.inference_mode():
            x = batch_uint8.to(self.device, non_blocking=True)
            x = normalize_batch(x, pre.mean, pre.std, dtype=torch.float32)
            x = x.contiguous(memory_format=torch.channels_last)
            use_amp = self.device.type != "cpu" and self.dtype != torch.float32
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=use_amp):
                return self._forward(x)

    def _results(self, out: ArrayOutput | HeadOutput, paths: Sequence[str | None]) -> list[ScoreResult]:
        """Head outputs (tensors or arrays, native scale) -> results; one NumPy mapping for every runtime."""
        score = _as_array(out.score)
        assert score is not None  # every head gives a score
        probs, var = _as_array(out.probs), _as_array(out.var)
        # The product scale is 1..10: a regression head may overshoot it (raw_score keeps the value).
        unit = np.clip(unit_scale(score, self.config.score_range), 1.0, 10.0).tolist()
        raw = score.tolist()
        lo, hi = self.model.config.score_range
        if var is not None:
            unc = (np.sqrt(var) * 9.0 / (hi - lo)).tolist()
        elif probs is not None:
            bins = np.arange(1, probs.shape[1] + 1, dtype=np.float32)
            mean = probs @ bins
            # Spread over bins 1..K, mapped like the score onto 1..10 (a no-op for 10 bins).
            std = np.sqrt((probs * (bins - mean[:, None]) ** 2).sum(1))
            unc = (std * 9.0 / (hi - lo)).tolist()
        else:
            unc = [None] * len(raw)
        dists = probs.tolist() if probs is not None else [None] * len(raw)
        bands = self.model.config.bands  # the model's own words (or none)
        results = []
        for p, u, r, d, c in zip(paths, unit, raw, dists, unc):
            bad = _non_finite(r, d, c)
            if bad:  # clamping keeps NaN and maps inf to 10: neither is a score
                results.append(ScoreResult(path=p, error=f"model produced a non-finite prediction ({bad})"))
                continue
            score_1_10 = round(u, 4)
            results.append(ScoreResult(
                path=p, score=score_1_10, raw_score=round(r, 6),
                band=rating_band(score_1_10, bands),  # the band of the score shown, also at a boundary (7.49996)
                distribution=[round(v, 5) for v in d] if d is not None else None,
                uncertainty=round(c, 4) if c is not None else None))
        return results

    # -- public API -------------------------------------------------------------------------
    def predict(self, image: str | os.PathLike | Image.Image | bytes) -> ScoreResult:
        """Score one image (path, PIL image or encoded bytes); raises ImageDecodeError on bad input."""
        return self.predict_batch([image], raise_errors=True)[0]

    def predict_batch(self, images: Sequence[str | os.PathLike | Image.Image | bytes], *,
                      raise_errors: bool = False) -> list[ScoreResult]:
        """Score images in memory or on disk; bad ones become error results unless ``raise_errors``."""
        pre = self.model.preprocess
        results: list[ScoreResult | None] = [None] * len(images)
        arrays, where = [], []
        for i, img in enumerate(images):
            label = os.fspath(img) if isinstance(img, (str, os.PathLike)) else None
            try:
                if is_url(img):
                    img = read_url(img, allow_urls=self.allow_urls, timeout=self.url_timeout)  # type: ignore[arg-type]
                pil = load_image(img, max_pixels=self.max_pixels, draft_size=pre.size)
                arrays.append(preprocess_to_array(pil, pre))
                where.append(i)
            except ImageDecodeError as exc:
                if raise_errors:
                    raise
                results[i] = ScoreResult(path=label, error=exc.reason)
        for start in range(0, len(arrays), self.batch_size):
            chunk = where[start:start + self.batch_size]
            out = self._run(self._stack(arrays[start:start + self.batch_size]))
            labels = [os.fspath(p) if isinstance(p := images[i], (str, os.PathLike)) else None for i in chunk]
            for i, res in zip(chunk, self._results(out, labels)):
                results[i] = res
        return [r for r in results if r is not None]

    def _stack(self, arrays: list[np.ndarray]) -> Any:
        """One uint8 batch: a NumPy array for ONNX Runtime, a tensor sharing its memory for PyTorch."""
        batch = np.stack(arrays)
        if self.backend == "onnx":
            return batch
        import torch

        return torch.from_numpy(batch)

    def score_files(self, paths: Sequence[str], *, skip: Iterable[str] = ()) -> Iterator[ScoreResult]:
        """Stream results for many files, in input order per batch; paths in ``skip`` are not scored.

        Memory stays flat: only ``batch_size * (workers * prefetch + 1)`` decoded images are alive.
        """
        skip = set(skip)
        todo = [p for p in paths if p not in skip] if skip else list(paths)
        if self.backend == "onnx" and self.decode == "cpu":  # NumPy batches: no torch in this process
            arrays = iter_array_batches(todo, self.model.preprocess, batch_size=self.batch_size,
                                        workers=self.workers, max_pixels=self.max_pixels,
                                        allow_urls=self.allow_urls, url_timeout=self.url_timeout)
            for ab in arrays:
                for i, reason in ab.errors:
                    yield ScoreResult(path=todo[i], error=reason)
                if ab.pixels is not None:
                    yield from self._results(self._run(ab.pixels), [todo[i] for i in ab.index])
            return
        from tastelab.io.loader import iter_batches

        batches = iter_batches(todo, self.model.preprocess, batch_size=self.batch_size, workers=self.workers,
                               pin_memory=self._device_type == "cuda", max_pixels=self.max_pixels,
                               allow_urls=self.allow_urls, url_timeout=self.url_timeout,
                               encoded_jpeg=self.decode == "device")
        for batch in batches:
            for i, reason in batch.errors:
                yield ScoreResult(path=todo[i], error=reason)
            index, pixels = batch.index, batch.pixels
            if batch.encoded:
                index, pixels, failed = self._decode_on_device(batch)
                for i, reason in failed:
                    yield ScoreResult(path=todo[i], error=reason)
            if pixels is not None:
                out = self._run(pixels)
                yield from self._results(out, [todo[i] for i in index])

    def _decode_on_device(self, batch: Batch) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
        """Decode a batch's still-encoded JPEGs on the model's device and join them to its other images."""
        import torch

        from tastelab.io.device_decode import decode_batch_on_device

        # ONNX Runtime takes host arrays: decode where the model's inputs live.
        decoded = decode_batch_on_device([(data, o) for _, data, o in batch.encoded], self.model.preprocess,
                                         self.device, self.max_pixels)
        index = list(batch.index)
        tensors = [batch.pixels.to(self.device, non_blocking=True)] if batch.pixels is not None else []
        failed = []
        for (i, _, _), item in zip(batch.encoded, decoded):
            if isinstance(item, str):
                failed.append((i, item))
            else:
                index.append(i)
                tensors.append(item[None])
        return index, (torch.cat(tensors) if tensors else None), failed


def _non_finite(raw: float, dist: list[float] | None, unc: float | None) -> str | None:
    """Which part of one prediction is NaN/inf (``"raw_score=nan"``), or None when all are finite."""
    if not math.isfinite(raw):
        return f"raw_score={raw}"
    if dist is not None and not all(math.isfinite(v) for v in dist):
        return "distribution has " + ", ".join(sorted({str(v) for v in dist if not math.isfinite(v)}))
    if unc is not None and not math.isfinite(unc):
        return f"uncertainty={unc}"
    return None


def _model_folder(model: object) -> Path | None:
    """The folder a Scorer's model argument names (a preset resolves to its packaged folder)."""
    folder = getattr(model, "folder", None)  # an OnnxModel knows its folder
    if isinstance(folder, (str, os.PathLike)):
        return Path(folder)
    if not isinstance(model, (str, os.PathLike)):
        return None
    path = Path(os.fspath(model))
    if path.is_dir():
        return path
    from tastelab.models.presets import preset_folder

    try:
        return preset_folder(os.fspath(model))
    except Exception:  # load_model reports an unknown name with its own message
        return None


def score_paths_to_file(scorer: Scorer, paths: Sequence[str], out: str | Path, *, resume: bool = True,
                        progress: Any = None, allow_mixed_models: bool = False) -> dict[str, int]:
    """Score ``paths`` into ``out`` (.jsonl/.csv/.parquet), skipping those already there.

    "Already there" means the same file (resolved path), however it was spelled before; the same file
    given twice in ``paths`` is scored once. Rows record the scorer's model (:attr:`Scorer.identity`);
    resuming a file another model wrote raises :class:`~tastelab.io.writers.ModelMismatchError` unless
    ``allow_mixed_models``. Returns counts: total, skipped (already done or repeated), scored, errors.
    """
    from tastelab.io.rows import resume_key
    from tastelab.io.writers import open_writer

    counts = {"total": len(paths), "skipped": 0, "scored": 0, "errors": 0}
    ident = scorer.identity
    with open_writer(out, resume=resume, model=ident.name, model_hash=ident.hash,
                     allow_mixed_models=allow_mixed_models) as writer:
        seen = set(writer.done_keys)
        todo = []
        for p in paths:
            key = resume_key(p)
            if key not in seen:
                seen.add(key)
                todo.append(p)
        counts["skipped"] = len(paths) - len(todo)
        for res in scorer.score_files(todo):
            writer.write(res.to_dict())
            counts["errors" if res.error else "scored"] += 1
            if progress is not None:
                progress(res)
    Path(out).touch(exist_ok=True)  # exists even when nothing was written (an empty shard): merges see it
    return counts
