"""Fitting one head on cached features, full batch: Bradley-Terry on votes, ridge-style MSE on scores.

Why full-batch L-BFGS on a real :class:`~tastelab.models.heads.Head`: a personal data set is small (hundreds to
tens of thousands of votes over at most a few thousand images), so one fit is seconds and deterministic, and the
fitted module IS the head a saved model folder carries: the model computes exactly the cross-validated function.
The L2 penalty acts on the weights of standardised inputs, so one log grid of strengths fits every feature set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tastelab.models.config import HeadConfig
from tastelab.models.heads import Head

#: L-BFGS iterations per fit (a ridge / logistic problem converges well within this; MLPs are stopped here).
MAX_ITER = 100


@dataclass(frozen=True)
class HeadSpec:
    """A head to try: hidden widths (empty = linear) and the L2 strength on its weights."""

    hidden: tuple[int, ...]
    lam: float

    @property
    def label(self) -> str:
        shape = "linear" if not self.hidden else "mlp" + "x".join(map(str, self.hidden))
        return f"{shape} l2={self.lam:g}"

    def config(self) -> HeadConfig:
        """The saved head's config: no dropout (the L2 penalty regularises), standardised inputs."""
        return HeadConfig(kind="score", hidden=list(self.hidden), activation="gelu", dropout_input=0.0,
                          dropout_hidden=0.0, dropout_output=0.0, standardize_input=True)


@dataclass(frozen=True)
class Pairs:
    """Votes as image indices: ``a`` beat ``b`` ``wa`` times, lost ``wb`` times."""

    a: np.ndarray
    b: np.ndarray
    wa: np.ndarray
    wb: np.ndarray

    def take(self, rows: np.ndarray | list[int]) -> Pairs:
        idx = np.asarray(rows, dtype=np.int64)
        return Pairs(self.a[idx], self.b[idx], self.wa[idx], self.wb[idx])

    def __len__(self) -> int:
        return len(self.a)


def fit_head(features: torch.Tensor, spec: HeadSpec, *, fit_images: np.ndarray, pairs: Pairs | None = None,
             targets: np.ndarray | None = None, seed: int = 0) -> Head:
    """Fit a head on ``features`` (all images, ``(N, D)``): input statistics from ``fit_images`` only (the
    training images: held-out images never shape the model), loss from ``pairs`` (Bradley-Terry on score
    differences) or ``targets`` (MSE on ``fit_images``, per-image scores aligned with ``fit_images``)."""
    if (pairs is None) == (targets is None):
        raise ValueError("fit_head: give pairs or targets")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Head(features.shape[1], spec.config())
    x_fit = features[torch.as_tensor(fit_images, dtype=torch.long)]
    head.set_input_stats(x_fit)
    if not spec.hidden:
        _fit_linear(head, features, spec.lam, fit_images=fit_images, pairs=pairs, targets=targets)
        head.eval()
        return head
    weights = [m.weight for m in head.mlp if isinstance(m, nn.Linear)]
    if pairs is not None:
        a = torch.as_tensor(pairs.a, dtype=torch.long)
        b = torch.as_tensor(pairs.b, dtype=torch.long)
        wa = torch.as_tensor(pairs.wa, dtype=torch.float32)
        wb = torch.as_tensor(pairs.wb, dtype=torch.float32)
        total = float((wa + wb).sum())
        used = torch.unique(torch.cat([a, b]))
        remap = torch.full((features.shape[0],), -1, dtype=torch.long)
        remap[used] = torch.arange(len(used))
        x_used, ra, rb = features[used], remap[a], remap[b]

        def data_loss() -> torch.Tensor:
            s = head(x_used).score
            d = s[ra] - s[rb]
            return -(wa * F.logsigmoid(d) + wb * F.logsigmoid(-d)).sum() / total
    else:
        y = torch.as_tensor(targets, dtype=torch.float32)
        var = float(y.var()) if len(y) > 1 and float(y.var()) > 0 else 1.0
        head.init_output_bias(float(y.mean()))

        def data_loss() -> torch.Tensor:
            return ((head(x_fit).score - y) ** 2).mean() / var

    params = [p for p in head.parameters() if p.requires_grad]
    head.train()
    _minimize(params, lambda: data_loss() + spec.lam * sum((w ** 2).sum() for w in weights))
    head.eval()
    for p in head.parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"fit of {spec.label} diverged (non-finite weights)")
    return head


def _minimize(params: list[nn.Parameter], loss_fn: Callable[[], torch.Tensor]) -> None:
    """Full-batch L-BFGS (SciPy's L-BFGS-B, autograd gradients): far less per-iteration overhead than
    torch.optim.LBFGS on problems this small."""
    from scipy.optimize import minimize
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        vector_to_parameters(torch.as_tensor(x, dtype=torch.float32), params)
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params])
        return float(loss.detach()), grad.double().numpy()

    x0 = parameters_to_vector(params).detach().double().numpy()
    fit = minimize(objective, x0, jac=True, method="L-BFGS-B", options={"maxiter": MAX_ITER, "gtol": 1e-6})
    with torch.no_grad():
        vector_to_parameters(torch.as_tensor(fit.x, dtype=torch.float32), params)


def _fit_linear(head: Head, features: torch.Tensor, lam: float, *, fit_images: np.ndarray, pairs: Pairs | None,
                targets: np.ndarray | None) -> None:
    """Linear heads: the same objective minimised by SciPy's L-BFGS-B in float64 with analytic gradients
    (convex; a fraction of torch's per-iteration overhead), then written into the head's one Linear layer."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    z = ((features.double() - head.feature_mean.double()) / head.feature_std.double()).numpy()
    dim = z.shape[1]
    if pairs is not None:
        used = np.unique(np.concatenate([pairs.a, pairs.b]))
        remap = np.full(len(z), -1)
        remap[used] = np.arange(len(used))
        zu, ra, rb = z[used], remap[pairs.a], remap[pairs.b]
        total = float((pairs.wa + pairs.wb).sum())

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            d = zu @ w
            d = d[ra] - d[rb]
            loss = -(pairs.wa * log_expit(d) + pairs.wb * log_expit(-d)).sum() / total
            coef = -(pairs.wa * expit(-d) - pairs.wb * expit(d)) / total  # d loss / d d
            g_s = np.bincount(ra, coef, len(used)) - np.bincount(rb, coef, len(used))
            return loss + lam * float(w @ w), zu.T @ g_s + 2 * lam * w

        fit = minimize(objective, np.zeros(dim), jac=True, method="L-BFGS-B",
                       options={"maxiter": 2 * MAX_ITER, "gtol": 1e-7})
        weight, bias = fit.x, 0.0
    else:
        assert targets is not None
        zf, y = z[fit_images], np.asarray(targets, dtype=np.float64)
        var = float(y.var(ddof=1)) if len(y) > 1 and y.var() > 0 else 1.0
        n = len(y)

        def objective(wb: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = wb[:-1], wb[-1]
            r = zf @ w + b - y
            loss = float(r @ r) / n / var + lam * float(w @ w)
            return loss, np.concatenate([2 * zf.T @ r / n / var + 2 * lam * w, [2 * r.sum() / n / var]])

        fit = minimize(objective, np.concatenate([np.zeros(dim), [y.mean()]]), jac=True, method="L-BFGS-B",
                       options={"maxiter": 2 * MAX_ITER, "gtol": 1e-7})
        weight, bias = fit.x[:-1], float(fit.x[-1])
    linear = head.mlp[-1]
    assert isinstance(linear, nn.Linear)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32)[None])
        linear.bias.fill_(bias)


@torch.no_grad()
def predict(head: Head, features: torch.Tensor) -> np.ndarray:
    """The head's scores for ``features`` as float64 NumPy (no dropout: eval mode)."""
    head.eval()
    return head(features).score.double().numpy()
