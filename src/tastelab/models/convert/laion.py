"""``tastelab convert laion-v2``: the LAION aesthetic predictor v2 as a tastelab model folder.

The predictor (christophschuhmann/improved-aesthetic-predictor, ``simple_inference.py``; the weights behind
LAION-Aesthetics, e.g. ``sac+logos+ava1-l14-linearMSE.pth``) is an MLP on CLIP ViT-L/14 image embeddings:

    emb = L2-normalise(CLIP.encode_image(image))             # 768-d, ViT-L/14
    score = Sequential(Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2),
                       Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1))(emb)

with no activation between the linear layers (the original's ``nn.ReLU()`` lines are commented out), and the
score on AVA's ~1..10 scale. The ``.pth`` holds that module's state dict: ``layers.{0,2,4,6,7}.{weight,bias}``.

The folder this writes reproduces it exactly: backbone ``hf`` CLIP with ``pooling: image_embeds`` (the
projected image embedding, L2-normalised, as the original normalises it), head ``kind: score`` with hidden
widths ``[1024, 128, 64, 16]``, ``activation: identity``, no input standardisation, ``score_range`` 1..10
(the 1..10 product scale *is* the original's scale; the Scorer's ``raw_score`` is the original's output
unclamped). Dropout only acts in training, so it is left out. Only the head travels in the folder; the CLIP
encoder is recorded by name (``openai/clip-vit-large-patch14``) and loads from the Hugging Face hub / cache,
like any hub backbone.

The ``.pth`` is loaded with ``torch.load(weights_only=True)``: a file that needs anything beyond plain tensors
(pickled code) is refused, never run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tastelab.core.errors import UserError, one_line
from tastelab.models.artifact import save_model
from tastelab.models.backbones import build_backbone
from tastelab.models.config import BackboneConfig, HeadConfig, ModelConfig
from tastelab.models.convert import LAION_V2_CLIP
from tastelab.models.heads import Head
from tastelab.models.model import TasteModel

__all__ = ["LAION_V2_CLIP", "LINEAR_INDEXES", "convert_laion_v2", "read_laion_v2_weights"]

logger = logging.getLogger(__name__)

#: Positions of the Linear layers in the original ``nn.Sequential`` (Dropouts sit at 1, 3 and 5).
LINEAR_INDEXES = (0, 2, 4, 6, 7)


def read_laion_v2_weights(path: str | os.PathLike) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The five (weight, bias) pairs of a LAION v2 predictor ``.pth``, in order, as float32.

    Raises :class:`~tastelab.core.errors.UserError` (one line naming the file) for anything that is not exactly
    that state dict: a file ``torch.load(weights_only=True)`` refuses, other keys, shapes that do not chain,
    a last layer with more than one output, or non-finite numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected the LAION aesthetic predictor's .pth state dict)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False: not advice to pass on; keep what it found
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. Please|\n\n|$)", str(exc), re.S)
        what = one_line(found.group(1)) if found else one_line(str(exc))
        raise UserError(f"{path}: refused: torch.load(weights_only=True) found more than plain tensors "
                        f"({what[:200]}); tastelab never unpickles code") from exc
    except Exception as exc:  # garbage makes torch.load fail in many ways (KeyError, EOFError, RuntimeError...)
        reason = one_line(str(exc))[:200] or type(exc).__name__
        raise UserError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {reason})") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a PyTorch Lightning checkpoint of the same module
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state dict of tensors (the improved-aesthetic-predictor MLP), "
                        f"got {type(obj).__name__}")
    expected = [f"layers.{i}.{p}" for i in LINEAR_INDEXES for p in ("weight", "bias")]
    missing = [k for k in expected if k not in obj]
    unexpected = sorted(str(k) for k in obj if k not in expected)
    if missing or unexpected:
        raise UserError(f"{path}: not the LAION aesthetic predictor v2 layout (layers.{{0,2,4,6,7}}.weight/bias): "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    width: int | None = None
    for i in LINEAR_INDEXES:
        w, b = obj[f"layers.{i}.weight"], obj[f"layers.{i}.bias"]
        if w.ndim != 2 or tuple(b.shape) != (w.shape[0],):
            raise UserError(f"{path}: layers.{i}: weight {tuple(w.shape)} and bias {tuple(b.shape)} are not a "
                            "Linear layer's")
        if width is not None and w.shape[1] != width:
            raise UserError(f"{path}: layers.{i}.weight takes {w.shape[1]} inputs but the layer before gives "
                            f"{width}")
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise UserError(f"{path}: layers.{i} holds non-finite numbers (NaN or infinity)")
        width = int(w.shape[0])
        layers.append((w.detach().float().clone(), b.detach().float().clone()))
    if width != 1:
        raise UserError(f"{path}: the last layer (layers.7) has {width} outputs; the predictor gives one score")
    return layers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def convert_laion_v2(weights: str | os.PathLike, out: str | os.PathLike, *, clip: str = LAION_V2_CLIP,
                     revision: str | None = None, name: str = "laion-aesthetic-v2") -> Path:
    """Write the LAION aesthetic predictor v2 in ``weights`` as a tastelab model folder ``out`` (atomically).

    ``clip``: the CLIP the MLP was trained on, a hub id (default ``openai/clip-vit-large-patch14``, which must
    be downloadable or in the Hugging Face cache) or a local checkpoint folder (recorded as an absolute
    path). Its projected embedding width must equal the MLP's input width (768 for ViT-L/14). Returns ``out``.
    """
    weights = Path(weights)
    layers = read_laion_v2_weights(weights)
    if Path(clip).expanduser().is_dir():
        clip = str(Path(clip).expanduser().resolve())  # a relative name would be read from the cwd at load time
    backbone_cfg = BackboneConfig(kind="hf", name=clip, revision=revision, pooling="image_embeds")
    head_cfg = HeadConfig(kind="score", hidden=[int(w.shape[0]) for w, _ in layers[:-1]], activation="identity",
                          dropout_input=0.0, dropout_hidden=0.0, dropout_output=0.0, standardize_input=False)
    backbone = build_backbone(backbone_cfg)  # a hub model missing offline: a UserError saying what to do
    in_dim = int(layers[0][0].shape[1])
    if backbone.num_features != in_dim:
        raise UserError(f"{weights}: the MLP takes {in_dim}-d CLIP embeddings, but {clip} gives "
                        f"{backbone.num_features}-d ones; pass the CLIP it was trained on with --clip "
                        f"({LAION_V2_CLIP} for the v2 ViT-L/14 weights)")
    head = Head(in_dim, head_cfg)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert len(linears) == len(layers), head.mlp
    with torch.no_grad():
        for lin, (w, b) in zip(linears, layers):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    _check_head(head, layers)
    cfg = ModelConfig(
        name=name,
        description="LAION aesthetic predictor v2 (improved-aesthetic-predictor MLP on L2-normalised CLIP image "
                    "embeddings), converted by `tastelab convert laion-v2`; scores on its ~1..10 scale.",
        bands=None,  # aesthetic scores, not the image-quality words
        backbone=backbone_cfg, head=head_cfg, preprocess=backbone.default_preprocess(),
        score_range=(1.0, 10.0), feature_dim=in_dim,
        training={"converted_from": "laion-v2", "source_file": weights.name, "source_sha256": _sha256(weights),
                  "clip": clip})
    folder = save_model(TasteModel(cfg, backbone, head).eval(), out)
    logger.info("converted %s -> %s (CLIP %s)", weights, folder, clip)
    return folder


def _check_head(head: nn.Module, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The head must compute the original's chain of affine maps (guards the Head's layer layout)."""
    x = torch.nn.functional.normalize(torch.randn(4, layers[0][0].shape[1], generator=torch.Generator().manual_seed(0)),
                                      dim=-1)
    ref = x
    for w, b in layers:
        ref = ref @ w.T + b
    with torch.no_grad():
        got = head.eval()(x).score
    if not torch.allclose(got, ref[:, 0], rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"converted head differs from the original MLP (max |diff| "
                           f"{(got - ref[:, 0]).abs().max().item():.3g}); this is a tastelab bug")
