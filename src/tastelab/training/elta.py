"""ELTA: an enhancer against long-tailed labels for aesthetics / quality predictors.

After Liu, He, Ming, Xie & Ma, "ELTA: An Enhancer against Long-Tail for Aesthetics-oriented Models",
ICML 2024 (PMLR 235:31106-31118), written from the method's description. Aesthetic and quality labels
are long-tailed (few very bad and very good images), so a regressor learns to predict the mean. ELTA
has three parts, each a default-off option of the trainer (``train.elta.*``) that works with any
backbone and head:

1. **Tail feature augmentation** (``mixup``): per batch, draw anchors with a probability that rises
   with the distance of their score from the batch mean, pair each with a partner of *close* score and
   mix their pooled features and labels (score and distribution) with one weight; the mixed samples are
   appended to the batch the head sees. New tail samples are made without moving labels toward the mean.
2. **Feature-label similarity alignment** (``similarity_weight``): an MSE between the cosine-similarity
   matrix of the batch's features and a label-similarity matrix ``1 - |s_i - s_j| / range``, so that
   feature geometry follows the label geometry (the paper's "distribution mismatch").
3. **Adaptive sharpening + self-training** (:func:`tastelab.selftrain.self_train`): predict on unlabelled
   images, sharpen each prediction more the further it lies from the label mean
   (``z * exp(beta |s_bar - s_hat| / range)``), keep the confident ones as pseudo-labels and retrain with
   them. Sharpening raises the confidence of tail predictions, which a plain confidence threshold would
   mostly throw away.

Everything random (anchor and partner draws) comes from a generator seeded by (seed, epoch, batch index,
process), never from the global RNG, so a resumed run replays exactly what an uninterrupted one does.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tastelab.core.atomic import write_text_atomic
from tastelab.io.records import Record, load_mos_table
from tastelab.models.config import StrictModel

if TYPE_CHECKING:
    from tastelab.models.heads import Head, HeadOutput

logger = logging.getLogger(__name__)

PSEUDO_FILE = "pseudo_labels.csv"

Mix = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A mixup plan: (anchor indexes (M,), partner indexes (M,), mixing weights lambda (M,))."""


class EltaConfig(StrictModel):
    """``train.elta``: ELTA's switches and knobs; everything is off by default."""

    mixup: bool = Field(default=False, description="Tail feature augmentation: mix pooled features of tail "
                        "anchors with close-score partners and append them to the batch for the head.")
    tau1: float = Field(default=0.1, gt=0, description="Anchor temperature: softmax(|s - batch mean| / range / "
                        "tau1); smaller favours the tails more strongly.")
    tau2: float = Field(default=0.05, gt=0, description="Partner temperature: softmax(-|s_j - s_anchor| / range / "
                        "tau2); smaller picks partners closer in score.")
    mix_count: int | float = Field(default=0.25, description="Mixed samples per batch: an int is a count, a "
                                   "float a fraction of the batch size (rounded, at least 1).")
    mix_weight: float = Field(default=1.0, ge=0, description="Loss weight of a mixed sample relative to a real "
                              "one (multiplies the mixed per-sample weight).")
    similarity_weight: float = Field(default=0.0, ge=0, description="Weight of the feature-label similarity "
                                     "alignment loss; 0 = off.")
    similarity_features: Literal["head", "pooled"] = Field(
        default="head", description="Features the alignment loss sees: 'head' = the head's last hidden "
        "layer (trains on every path, including frozen cached features); 'pooled' = the backbone's pooled "
        "features (only trainable with lora/full or a learned layer combination).")
    sharpen_beta: float = Field(default=1.0, ge=0, description="Self-training: logits (or precision) scaled "
                                "by exp(beta * |label mean - prediction| / range); 0 = no sharpening.")
    pseudo_threshold: float = Field(default=0.5, ge=0, le=1, description="Self-training: keep a pseudo-label "
                                    "when its confidence (max probability after sharpening) is at least this.")
    pseudo_weight: float = Field(default=1.0, gt=0, description="Self-training: per-sample loss weight of "
                                 "pseudo-labelled images (real labels have their own, usually 1).")
    mc_samples: int = Field(default=16, ge=2, description="Self-training with a scalar score head: "
                            "MC-dropout passes that estimate the prediction's spread.")
    rounds: int = Field(default=1, ge=1, description="Self-training rounds after the supervised round 0.")
    pseudo_labels: str | None = Field(default=None, description="Pseudo-label file (image,score,weight"
                                      "[,distribution]) appended to the TRAIN split; self-train sets it.")

    @field_validator("mix_count")
    @classmethod
    def _mix_count(cls, v: int | float) -> int | float:
        if isinstance(v, bool):
            raise ValueError("mix_count must be a number")
        if isinstance(v, int) and v < 1:
            raise ValueError("an int mix_count is a count and must be >= 1 (use a float for a fraction)")
        if isinstance(v, float) and not 0 < v <= 4:
            raise ValueError("a float mix_count is a fraction of the batch and must be in (0, 4]")
        return v

    @property
    def active(self) -> bool:
        """Whether the training step changes (mixup or alignment loss on)."""
        return self.mixup or self.similarity_weight > 0


def score_width(score_range: tuple[float, float]) -> float:
    lo, hi = score_range
    if not hi > lo:
        raise ValueError(f"score_range must be increasing, got {score_range}")
    return float(hi - lo)


# ---------------------------------------------------------------------------------------------- mixup


def anchor_probabilities(scores: torch.Tensor, score_range: tuple[float, float], tau1: float) -> torch.Tensor:
    """Probability of each sample to be a mixup anchor: ``softmax_i(|s_i - mean(s)| / range / tau1)``.

    The distance from the *batch* mean is normalised by the label range so ``tau1`` means the same on
    every scale. Rising with the distance, it picks tail samples (very bad / very good) more often.
    """
    s = scores.detach().float()
    d = (s - s.mean()).abs() / score_width(score_range)
    return torch.softmax(d / tau1, dim=0)


def partner_probabilities(scores: torch.Tensor, anchors: torch.Tensor, score_range: tuple[float, float],
                          tau2: float) -> torch.Tensor:
    """Partner distribution per anchor, ``(M, B)``: ``softmax_j(-|s_j - s_a| / range / tau2)``, ``j != a``.

    A partner close in score keeps the mixed label in the tail ("preserving their intrinsic aesthetic
    qualities"), unlike plain mixup which pulls tail labels toward the mean.
    """
    s = scores.detach().float()
    logits = -(s[None, :] - s[anchors][:, None]).abs() / (score_width(score_range) * tau2)
    logits[torch.arange(len(anchors)), anchors] = float("-inf")
    return torch.softmax(logits, dim=1)


def mixing_weights(anchor_probs: torch.Tensor, anchors: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """Mixing weight of the anchor: ``lambda = pi_a / (pi_a + pi_p)`` with ``pi`` the anchor probabilities.

    The two samples' tail probabilities decide: the rarer one dominates the mix. Equivalently
    ``lambda = sigmoid((d_a - d_p) / tau1)`` with ``d`` the normalised distances from the batch mean.
    """
    pa, pp = anchor_probs[anchors], anchor_probs[partners]
    return pa / (pa + pp)


def resolve_mix_count(mix_count: int | float, batch_size: int) -> int:
    """Mixed samples for a batch: an int is a count, a float a fraction of the batch (at least 1)."""
    if isinstance(mix_count, float):
        return max(1, round(mix_count * batch_size))
    return int(mix_count)


def mix_generator(seed: int, epoch: int, batch_index: int, rank: int = 0) -> torch.Generator:
    """CPU generator seeded from (seed, epoch, batch index, process): resumes replay the same draws."""
    digest = hashlib.blake2b(f"elta:{seed}:{epoch}:{batch_index}:{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def mix_plan(scores: torch.Tensor, n_mix: int, score_range: tuple[float, float], tau1: float, tau2: float,
             generator: torch.Generator) -> Mix | None:
    """Draw ``n_mix`` (anchor, partner, lambda) triples for a batch; None when it cannot mix (B < 2).

    Anchors are drawn with replacement from :func:`anchor_probabilities`, one partner per anchor from
    :func:`partner_probabilities`, weights from :func:`mixing_weights`. Indexes are on the CPU.
    """
    s = scores.detach().float().cpu()
    if s.numel() < 2 or n_mix < 1:
        return None
    pi = anchor_probabilities(s, score_range, tau1)
    anchors = torch.multinomial(pi, n_mix, replacement=True, generator=generator)
    partners = torch.multinomial(partner_probabilities(s, anchors, score_range, tau2), 1,
                                 generator=generator).squeeze(1)
    return anchors, partners, mixing_weights(pi, anchors, partners)


def mix_rows(x: torch.Tensor, mix: Mix) -> torch.Tensor:
    """The mixed rows ``lambda * x[a] + (1 - lambda) * x[p]`` (features or label distributions)."""
    a, p, lam = (t.to(x.device) for t in mix)
    lam = lam.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return lam * x[a] + (1 - lam) * x[p]


def mix_features(features: torch.Tensor, mix: Mix) -> torch.Tensor:
    """``(B + M, D)``: the batch's pooled features with the mixed ones appended."""
    return torch.cat([features, mix_rows(features, mix)])


def mix_targets(batch: dict[str, torch.Tensor], mix: Mix, mix_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Targets for ``B + M`` rows: score and distribution mixed with the same lambda as the features.

    A mixed sample's weight is the mix of its parents' weights times ``mix_weight``. The mixed score of
    distribution labels equals the mean of the mixed distribution (the mean is linear).
    """
    out = dict(batch)
    out["score"] = torch.cat([batch["score"], mix_rows(batch["score"].float(), mix).to(batch["score"].dtype)])
    w = batch["weight"]
    out["weight"] = torch.cat([w, (mix_rows(w.float(), mix) * mix_weight).to(w.dtype)])
    if "dist" in batch:
        out["dist"] = torch.cat([batch["dist"], mix_rows(batch["dist"].float(), mix).to(batch["dist"].dtype)])
    return out


# ----------------------------------------------------------------------------------- alignment loss


def label_similarity(scores: torch.Tensor, score_range: tuple[float, float]) -> torch.Tensor:
    """``(B, B)`` label similarity ``1 - |s_i - s_j| / range`` (1 on the diagonal, 0 for opposite ends)."""
    s = scores.float()
    return 1.0 - (s[:, None] - s[None, :]).abs() / score_width(score_range)


def feature_similarity(features: torch.Tensor) -> torch.Tensor:
    """``(B, B)`` cosine similarity of feature rows (computed in fp32)."""
    f = nn.functional.normalize(features.float(), dim=1, eps=1e-8)
    return f @ f.T


def similarity_loss(features: torch.Tensor, scores: torch.Tensor, score_range: tuple[float, float],
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Feature-label similarity alignment: ``sum_{i!=j} w_i w_j (cos_ij - S_ij)^2 / sum_{i!=j} w_i w_j``.

    ``S`` is :func:`label_similarity`; for distribution labels pass their mean scores. The diagonal is left
    out (both matrices are 1 there). With unit weights this is the plain mean over ordered pairs ``i != j``.
    A batch of one sample gives 0 (still attached to the graph).
    """
    n = features.shape[0]
    if n < 2:
        return features.float().sum() * 0.0
    diff = feature_similarity(features) - label_similarity(scores.to(features.device), score_range)
    w = torch.ones(n, device=features.device) if weight is None else weight.float().to(features.device)
    pair = w[:, None] * w[None, :] * (1.0 - torch.eye(n, device=features.device))
    return (pair * diff.pow(2)).sum() / pair.sum().clamp_min(1e-12)


# ------------------------------------------------------------------------------ forward with ELTA


def _embedding_tap(head: Head) -> tuple[nn.Module, bool]:
    """Module whose output (False) or input (True) is the head's last hidden representation."""
    acts = [m for m in head.mlp if isinstance(m, (nn.GELU, nn.ReLU, nn.SiLU))]
    if acts:
        return acts[-1], False  # after the activation, before hidden/output dropout
    return head.mlp[-1], True  # no hidden layer: the (standardised) input of the output layer


def head_forward(head: Head, features: torch.Tensor, mix: Mix | None = None,
                 embed: Literal["head", "pooled"] | None = None) -> tuple[HeadOutput, torch.Tensor | None]:
    """pooled features -> [append mixed rows] -> head; also returns the B original rows' embedding.

    The trainer's wrapped modules call this inside their ``forward`` so DDP/accelerate see one forward.
    """
    n = features.shape[0]
    x = mix_features(features, mix) if mix is not None else features
    if embed != "head":
        return head(x), (features if embed == "pooled" else None)
    captured: list[torch.Tensor] = []
    module, use_input = _embedding_tap(head)
    if use_input:
        hook = module.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    else:
        hook = module.register_forward_hook(lambda _m, _args, out: captured.append(out))
    try:
        out = head(x)
    finally:
        hook.remove()
    return out, captured[-1][:n]


# ------------------------------------------------------------------------------ adaptive sharpening


def sharpen_factor(pred_score: torch.Tensor, label_mean: float, score_range: tuple[float, float],
                   beta: float) -> torch.Tensor:
    """``exp(beta * |label_mean - pred| / range)`` (>= 1): predictions far from the mean get sharper.

    The distance is normalised by the label range so ``beta`` is scale-free (a prediction at the far end
    of a range centred on the mean gets ``exp(beta / 2)``).
    """
    return torch.exp(beta * (pred_score.float() - label_mean).abs() / score_width(score_range))


def sharpen_logits(logits: torch.Tensor, pred_score: torch.Tensor, label_mean: float,
                   score_range: tuple[float, float], beta: float) -> torch.Tensor:
    """Adaptive sharpening of distribution logits: ``z' = z * exp(beta * |s_bar - s_hat| / range)``.

    Scaling logits by a factor > 1 is a temperature below 1: the distribution concentrates on its mode.
    """
    return logits.float() * sharpen_factor(pred_score, label_mean, score_range, beta)[:, None]


def sharpen_variance(var: torch.Tensor, pred_score: torch.Tensor, label_mean: float,
                     score_range: tuple[float, float], beta: float) -> torch.Tensor:
    """The Gaussian analogue: ``var' = var / exp(beta * |s_bar - s_hat| / range)``.

    Gaussian log-density over a score grid is ``-(c - mu)^2 / (2 var)``; multiplying these logits by the
    factor is exactly dividing the variance by it, so this is the same sharpening as :func:`sharpen_logits`.
    """
    return var.float() / sharpen_factor(pred_score, label_mean, score_range, beta)


def gaussian_confidence(var: torch.Tensor, half_width: float) -> torch.Tensor:
    """Mass of ``N(mu, var)`` within ``mu +- half_width``: ``erf(half_width / sqrt(2 var))``.

    The continuous analogue of a distribution head's max bin probability (the most probable bin of
    width ``2 * half_width``), without quantising the score to a bin.
    """
    return torch.erf(half_width / torch.sqrt(2.0 * var.float().clamp_min(1e-12)))


@dataclass
class PseudoLabels:
    """Self-training candidates: sharpened prediction, confidence and whether it passes the threshold."""

    paths: list[str]
    score: torch.Tensor  # (N,) native scale
    confidence: torch.Tensor  # (N,)
    keep: torch.Tensor  # (N,) bool
    dist: torch.Tensor | None = None  # (N, K) sharpened distribution (distribution heads)

    def kept(self) -> list[tuple[str, float, float, list[float] | None]]:
        idx = torch.nonzero(self.keep).flatten().tolist()
        return [(self.paths[i], float(self.score[i]), float(self.confidence[i]),
                 self.dist[i].tolist() if self.dist is not None else None) for i in idx]


def pseudo_labels(paths: Sequence[str], kind: str, *, score: torch.Tensor, label_mean: float,
                  score_range: tuple[float, float], beta: float, threshold: float,
                  logits: torch.Tensor | None = None, var: torch.Tensor | None = None,
                  num_bins: int = 10) -> PseudoLabels:
    """Sharpen predictions adaptively and keep those with confidence >= ``threshold``.

    - distribution heads: :func:`sharpen_logits` on the K-bin logits; confidence = max probability of
      the sharpened distribution; pseudo-label = that distribution, score = its mean over bins 1..K.
    - gaussian heads (``var`` = predicted variance) and scalar heads (``var`` = MC-dropout variance of the
      prediction): :func:`sharpen_variance`; confidence = :func:`gaussian_confidence` with the half width
      of one bin of a ``num_bins`` grid over the score range (``range / (num_bins - 1) / 2``), i.e. the
      probability of the most probable bin, as for a distribution head; score = the prediction itself
      (sharpening a symmetric Gaussian leaves its mean where it is).
    """
    score = score.float().cpu()
    dist = None
    if kind == "distribution":
        if logits is None:
            raise ValueError("a distribution head's pseudo-labels need its logits")
        dist = torch.softmax(sharpen_logits(logits.cpu(), score, label_mean, score_range, beta), dim=1)
        conf = dist.max(dim=1).values
        bins = torch.arange(1, dist.shape[1] + 1, dtype=torch.float32)
        out_score = dist @ bins
    else:
        if var is None:
            raise ValueError(f"a {kind} head's pseudo-labels need a variance (predicted or MC-dropout)")
        half = score_width(score_range) / (num_bins - 1) / 2
        conf = gaussian_confidence(sharpen_variance(var.cpu(), score, label_mean, score_range, beta), half)
        out_score = score
    return PseudoLabels(list(paths), out_score, conf, conf >= threshold, dist)


def write_pseudo_labels(path: str | os.PathLike, labels: PseudoLabels, weight: float) -> int:
    """Write the kept pseudo-labels as a MOS table ``image,score,weight,confidence[,distribution]``.

    Image paths are absolute; the distribution (distribution heads) is space-separated. Written
    atomically; returns the number of rows.
    """
    rows = labels.kept()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    has_dist = labels.dist is not None
    w.writerow(["image", "score", "weight", "confidence", *(["distribution"] if has_dist else [])])
    for p, s, c, d in rows:
        extra = [" ".join(f"{x:.6g}" for x in d)] if d is not None else []
        w.writerow([os.path.abspath(p), f"{s:.6g}", f"{weight:g}", f"{c:.6g}", *extra])
    write_text_atomic(path, buf.getvalue())
    return len(rows)


def load_pseudo_labels(path: str | os.PathLike, score_range: tuple[float, float]) -> list[Record]:
    """Records of a pseudo-label file (the MOS-table loader, plus the optional distribution column)."""
    path = Path(path)
    rs = load_mos_table(path, image_root=path.parent, path_column="image", score_column="score",
                        weight_column="weight", score_range=score_range)
    out = []
    for r in rs.records:
        raw = (r.extra or {}).get("distribution")
        dist = tuple(float(x) for x in raw.split()) if raw else None
        out.append(Record(r.path, r.score, dist, r.weight, None, r.source, dict(r.extra)))
    return out
