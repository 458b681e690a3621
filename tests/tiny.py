"""Tiny, offline models and generated images for tests (a plain module: ``import tiny``).

pytest's default ``prepend`` import mode puts ``tests/`` on ``sys.path`` (it holds a conftest.py and no
``__init__.py``), so test modules import this file directly. Nothing here touches the network: HF
encoders are built from config dicts with random weights, torchvision CNNs with ``weights=None``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tastelab.io.images import PreprocessConfig
from tastelab.models import BackboneConfig, HeadConfig, LoraSettings, ModelConfig, TasteModel

HF_IMAGE_SIZE = 32
CNN_IMAGE_SIZE = 64
HIDDEN = 32
N_LAYERS = 2

_FAMILY_NORM = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mobilenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "lite": ((0.498, 0.498, 0.498), (0.502, 0.502, 0.502)),
    "statistics": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # the only norm it reads
}


def one_torch_thread() -> Iterator[None]:
    """Generator for a module fixture: run torch single-threaded, then restore the thread count.

    On a busy 2-core machine intra-op threading makes every op of a tiny model wait on the other
    thread (a 64x64 MobileNet forward measured 1.3 s with 2 threads, 0.03 s with 1).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Hugging Face encoder configs


def _tiny_vit(model_type: str, overrides: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": 2,
        "image_size": HF_IMAGE_SIZE,
        "patch_size": 8,
    }
    cfg.update(overrides)
    return cfg


def tiny_siglip_config(**overrides: Any) -> dict[str, Any]:
    """A 2-layer, 32-wide SigLIP vision tower on 32x32 images (16 patches, no CLS token)."""
    return _tiny_vit("siglip_vision_model", overrides)


def tiny_clip_config(**overrides: Any) -> dict[str, Any]:
    """A 2-layer, 32-wide CLIP vision tower on 32x32 images (CLS + 16 patches)."""
    return _tiny_vit("clip_vision_model", overrides)


def tiny_dinov2_config(**overrides: Any) -> dict[str, Any]:
    """A 2-layer, 32-wide DINOv2 on 32x32 images (CLS + 16 patches)."""
    return _tiny_vit("dinov2", overrides)


_HF_CONFIGS = {"siglip": tiny_siglip_config, "clip": tiny_clip_config, "dinov2": tiny_dinov2_config}
FAMILIES = ("siglip", "clip", "dinov2", "mobilenet")
#: A tiny family per registered backbone kind (tastelab.models.registries.BACKBONES): a newly registered
#: kind fails the registry tests until it gets a tiny, offline config here.
#: One tiny family per backbone kind (tests/test_registry.py builds each). "lite" (EfficientNet-Lite0, random
#: init) is not in FAMILIES: the model-level suites run on those; tests/test_lite_backbone.py covers it.
FAMILY_BY_BACKBONE_KIND = {"hf": "siglip", "torchvision": "mobilenet", "efficientnet_lite": "lite",
                           "statistics": "statistics"}


# --------------------------------------------------------------------------------------------------
# Model configs and models


def tiny_backbone_config(family: str = "siglip", **overrides: Any) -> BackboneConfig:
    """The backbone of :func:`tiny_model_config`; ``overrides`` set BackboneConfig fields (pooling...)."""
    if family == "mobilenet":
        fields: dict[str, Any] = {"kind": "torchvision", "name": "mobilenet_v2", "weights": None}
    elif family == "lite":
        fields = {"kind": "efficientnet_lite", "name": "efficientnet_lite0", "weights": None}
    elif family == "statistics":  # no weights: the tiny config is the real one
        fields = {"kind": "statistics", "name": "global_v1", "layers": [0, 1, 2], "pooling": "meanstd"}
    elif family in _HF_CONFIGS:
        fields = {"kind": "hf", "name": f"tiny-{family}", "hf_config": _HF_CONFIGS[family]()}
    else:
        raise ValueError(f"unknown tiny family {family!r}; use one of {FAMILIES}")
    fields.update(overrides)
    return BackboneConfig(**fields)


def tiny_model_config(
    kind: str = "distribution",
    family: str = "siglip",
    lora: LoraSettings | dict[str, Any] | None = None,
    *,
    num_bins: int = 10,
    score_range: tuple[float, float] | None = None,
    **backbone_overrides: Any,
) -> ModelConfig:
    """A complete, self-contained tiny model description (backbone weights travel in the folder)."""
    mean, std = _FAMILY_NORM[family]
    size = CNN_IMAGE_SIZE if family in ("mobilenet", "lite", "statistics") else HF_IMAGE_SIZE
    if score_range is None:
        score_range = (1.0, float(num_bins)) if kind == "distribution" else (1.0, 10.0)
    return ModelConfig(
        name=f"tiny-{family}-{kind}",
        backbone=tiny_backbone_config(family, **backbone_overrides),
        head=HeadConfig(kind=kind, hidden=[16], dropout_hidden=0.0, num_bins=num_bins),
        preprocess=PreprocessConfig(size=size, resize="squash", mean=mean, std=std),
        lora=LoraSettings(**lora) if isinstance(lora, dict) else lora,
        score_range=score_range,
        backbone_in_folder=True,
    )


def build_tiny_model(
    kind: str = "distribution",
    family: str = "siglip",
    lora: LoraSettings | dict[str, Any] | None = None,
    *,
    seed: int = 0,
    **config_kwargs: Any,
) -> TasteModel:
    """Build a tiny model in eval mode whose every saved part is non-trivial.

    Head input statistics are set away from (0, 1), the output bias moved and LoRA's B matrices
    (zero at init, which would make a lost adapter invisible) randomised, so a save/load round trip
    that drops any of them changes the outputs.
    """
    torch.manual_seed(seed)
    model = TasteModel.build(tiny_model_config(kind, family, lora, **config_kwargs))
    with torch.no_grad():
        dim = model.head.in_dim
        model.head.set_input_stats(torch.randn(64, dim) * 0.5 + 0.1)
        model.head.init_output_bias(5.0)
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
            elif "layer_logits" in name:
                p.normal_(0.0, 1.0)
    return model.eval()


def save_tiny_model(folder: str | Path, kind: str = "distribution", family: str = "siglip",
                    lora: LoraSettings | dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """Build a tiny model and save it as a model folder; returns the folder."""
    from tastelab.models import save_model

    return save_model(build_tiny_model(kind, family, lora, **kwargs), folder)


def custom_code_checkpoint(folder: str | Path, marker: str | Path) -> Path:
    """A local HF checkpoint whose config class lives in its own Python file; importing it writes ``marker``:
    the proof that a checkpoint's code ran (it has no real model class, so loading then fails)."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True)
    (folder / "evil_config.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n"
        "    model_type = 'tastelab_evil'\n")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tastelab_evil", "auto_map": {"AutoConfig": "evil_config.EvilConfig",
                                                    "AutoModel": "evil_config.EvilConfig"}}))
    return folder


def pixels(model: TasteModel, n: int = 3, seed: int = 1) -> torch.Tensor:
    """Normalised-looking random input of the model's preprocess size."""
    g = torch.Generator().manual_seed(seed)
    size = model.preprocess.size
    return torch.randn(n, 3, size, size, generator=g)


# --------------------------------------------------------------------------------------------------
# Images


def _pattern(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A varied RGB picture: a gradient, a blob and noise, different per seed."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    grad = (xx / max(w - 1, 1))[..., None] * rng.uniform(-120, 120, size=3)
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, max(w, h) / 2)
    blob = (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)[..., None] * rng.uniform(-100, 100, size=3)
    noise = rng.normal(0, 8 + 6 * (seed % 5), size=(h, w, 3))
    return np.clip(base + grad + blob + noise, 0, 255).astype(np.uint8)


def make_images(folder: str | Path, n: int = 5, size: tuple[int, int] = (48, 40)) -> list[Path]:
    """Write ``n`` varied, valid images into ``folder`` and return their paths (sorted by name).

    The mix cycles through an RGB JPEG, an RGBA PNG, a palette GIF, a JPEG whose name has spaces and
    non-ASCII letters, and a greyscale PNG.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = _pattern(i, size)
        rgb = Image.fromarray(arr, "RGB")
        kind = i % 5
        if kind == 0:
            path = folder / f"img_{i:02d}.jpg"
            rgb.save(path, quality=90)
        elif kind == 1:
            path = folder / f"img_{i:02d}_rgba.png"
            alpha = Image.fromarray(np.linspace(40, 255, size[0] * size[1], dtype=np.uint8).reshape(size[1],
                                                                                                   size[0]))
            rgba = rgb.copy()
            rgba.putalpha(alpha)
            rgba.save(path)
        elif kind == 2:
            path = folder / f"img_{i:02d}_palette.gif"
            rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(path)
        elif kind == 3:
            path = folder / f"phötö {i:02d} (copie) été.jpg"
            rgb.save(path, quality=80)
        else:
            path = folder / f"img_{i:02d}_grey.png"
            rgb.convert("L").save(path)
        paths.append(path)
    return sorted(paths)


def make_bad_files(folder: str | Path) -> dict[str, Path]:
    """Write files that look like images by name but cannot be decoded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.jpg"
    rng = np.random.default_rng(123)
    corrupt.write_bytes(b"\x00\x13\x37" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    text = folder / "notes.jpg"
    text.write_text("this is not a picture\njust some text saved with a .jpg name\n", encoding="utf-8")
    return {"corrupt": corrupt, "empty": empty, "text": text}


def make_brightness_dataset(root: str | Path, n: int = 32, start: int = 0) -> Path:
    """``root/img/im {i}.jpg`` for i in [start, start + n) whose brightness sets the label, and
    ``root/labels.csv`` (image,mos on 1..5): a learnable MOS table for fast training tests."""
    root = Path(root)
    rng = np.random.default_rng(start)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = ["image,mos"]
    for i in range(start, start + n):
        b = rng.uniform(0, 1)
        arr = (rng.uniform(0, 255, (36, 40, 3)) * 0.3 + b * 180).clip(0, 255).astype("uint8")
        Image.fromarray(arr).save(root / "img" / f"im {i}.jpg")
        rows.append(f"im {i}.jpg,{1 + 4 * b:.4f}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root
