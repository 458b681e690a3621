"""Fitting one head on cached features, full batch: Bradley-Terry on votes, ridge-style MSE on scores.

Why full-batch L-BFGS on a real :class:`~tastelab.models.heads.Head`: a personal data set is small (hundreds to
tens of thousands of votes over at most a few thousand images), so one fit is seconds and deterministic, and the
fitted module IS the head a saved model folder carries: the model computes exactly the cross-validated function.
The L2 penalty acts on the weights of standardised inputs, so one log grid of strengths fits every feature set.
"""

from __future__ import annotations

from collections import OrderedDict
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
    else:
        _fit_mlp(head, features, spec.lam, fit_images=fit_images, pairs=pairs, targets=targets)
    head.eval()
    for p in head.parameters():
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"fit of {spec.label} diverged (non-finite weights)")
    return head


def _fit_mlp(head: Head, features: torch.Tensor, lam: float, *, fit_images: np.ndarray, pairs: Pairs | None,
             targets: np.ndarray | None) -> None:
    """MLP heads, fitted in the span of the training inputs and folded back.

    With n training images and D >> n features, the L2-penalised optimum of the first layer lies in the span
    of the n standardised training rows (the off-span part of its weights only adds penalty), so the fit
    runs on the n-dimensional coordinates (an SVD basis P) and the first layer is saved as W P^T: the same
    function at a fraction of the cost."""
    z = (features.float() - head.feature_mean) / head.feature_std
    rows = np.unique(np.concatenate([pairs.a, pairs.b])) if pairs is not None else np.asarray(fit_images)
    _, sv, vt = torch.linalg.svd(z[torch.as_tensor(rows, dtype=torch.long)].double(), full_matrices=False)
    basis = vt[sv > sv.max() * 1e-7].T.float()  # (D, r)
    first = head.mlp[0]
    assert isinstance(first, nn.Linear)
    reduced = nn.Linear(basis.shape[1], first.out_features)
    last = head.mlp[-1]
    assert isinstance(last, nn.Linear)
    small = nn.Sequential(reduced, *list(head.mlp)[1:])
    with torch.no_grad():
        reduced.weight.copy_(first.weight @ basis)
        reduced.bias.copy_(first.bias)
    x = z[torch.as_tensor(rows, dtype=torch.long)] @ basis  # (n, r): the training rows in the basis
    weights = [m.weight for m in small if isinstance(m, nn.Linear)]
    if pairs is not None:
        remap = np.full(len(features), -1)
        remap[rows] = np.arange(len(rows))
        ra = torch.as_tensor(remap[pairs.a], dtype=torch.long)
        rb = torch.as_tensor(remap[pairs.b], dtype=torch.long)
        wa = torch.as_tensor(pairs.wa, dtype=torch.float32)
        wb = torch.as_tensor(pairs.wb, dtype=torch.float32)
        total = float((wa + wb).sum())

        def data_loss() -> torch.Tensor:
            s = small(x)[:, 0]
            d = s[ra] - s[rb]
            return -(wa * F.logsigmoid(d) + wb * F.logsigmoid(-d)).sum() / total
    else:
        y = torch.as_tensor(targets, dtype=torch.float32)
        var = float(y.var()) if len(y) > 1 and float(y.var()) > 0 else 1.0
        with torch.no_grad():
            last.bias.fill_(float(y.mean()))

        def data_loss() -> torch.Tensor:
            return ((small(x)[:, 0] - y) ** 2).mean() / var

    _minimize(list(small.parameters()), lambda: data_loss() + lam * sum((w ** 2).sum() for w in weights))
    with torch.no_grad():
        first.weight.copy_(reduced.weight @ basis.T)
        first.bias.copy_(reduced.bias)


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
    """Linear heads, solved exactly in the dual (w = Z^T alpha over the n training images, n << D): ridge in
    closed form, Bradley-Terry by damped Newton steps on an n x n system. Exact, deterministic and a few
    small matrix solves, then written into the head's one Linear layer."""
    if pairs is not None:
        used = np.unique(np.concatenate([pairs.a, pairs.b]))
        remap = np.full(len(features), -1)
        remap[used] = np.arange(len(used))
        zu, k = _gram(features, head, fit_images, used)
        alpha = _bt_dual(k, remap[pairs.a], remap[pairs.b], pairs.wa, pairs.wb, lam)
        weight, bias = zu.T @ alpha, 0.0
    else:
        assert targets is not None
        zf, k = _gram(features, head, fit_images, np.asarray(fit_images))
        y = np.asarray(targets, dtype=np.float64)
        n = len(y)
        var = float(y.var(ddof=1)) if n > 1 and y.var() > 0 else 1.0
        # min mean((Zw + b - y)^2) / var + lam |w|^2: columns of Z are centred on these images, so b = mean(y)
        # and alpha = (K + lam n var I)^-1 (y - mean y).
        alpha = np.linalg.solve(k + lam * n * var * np.eye(n), y - y.mean())
        weight, bias = zf.T @ alpha, float(y.mean())
    linear = head.mlp[-1]
    assert isinstance(linear, nn.Linear)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32)[None])
        linear.bias.fill_(bias)


#: Standardised rows and their Gram matrix for the last few (features, training rows): an L2 grid refits the
#: same folds once per strength, and the Gram matrix is most of a linear fit's cost.
_GRAMS: OrderedDict[tuple[int, bytes, bytes], tuple[torch.Tensor, np.ndarray, np.ndarray]] = OrderedDict()
GRAM_CACHE_SIZE = 12


def _gram(features: torch.Tensor, head: Head, fit_images: np.ndarray, rows: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """Standardised ``rows`` of ``features`` (statistics of ``fit_images``, already in ``head``) and their
    Gram matrix, memoised. The key holds the tensor's identity; the entry holds the tensor itself, so that
    identity cannot be reused by another tensor while the entry lives."""
    key = (id(features), np.asarray(fit_images, dtype=np.int64).tobytes(), np.asarray(rows, dtype=np.int64).tobytes())
    hit = _GRAMS.get(key)
    if hit is not None and hit[0] is features:
        _GRAMS.move_to_end(key)
        return hit[1], hit[2]
    idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    z = ((features[idx].double() - head.feature_mean.double()) / head.feature_std.double()).numpy()
    k = z @ z.T
    _GRAMS[key] = (features, z, k)
    while len(_GRAMS) > GRAM_CACHE_SIZE:
        _GRAMS.popitem(last=False)
    return z, k


def _bt_dual(k: np.ndarray, a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray, lam: float,
             max_iter: int = 50) -> np.ndarray:
    """Bradley-Terry with L2 on w = Z^T alpha: minimise L(K alpha) + lam alpha^T K alpha by Newton steps
    (H K + 2 lam I) step = g + 2 lam alpha with backtracking; H, g: the loss's Hessian / gradient in scores."""
    from scipy.special import expit, log_expit

    n = len(k)
    total = float((wa + wb).sum())

    def value(alpha: np.ndarray) -> float:
        s = k @ alpha
        d = s[a] - s[b]
        return float(-(wa * log_expit(d) + wb * log_expit(-d)).sum() / total + lam * alpha @ s)

    alpha = np.zeros(n)
    f = value(alpha)
    for _ in range(max_iter):
        s = k @ alpha
        d = s[a] - s[b]
        p = expit(d)
        coef = (-(wa * (1 - p)) + wb * p) / total  # dL/dd
        g = np.bincount(a, coef, n) - np.bincount(b, coef, n)
        c = (wa + wb) * p * (1 - p) / total  # d2L/dd2
        h = np.zeros((n, n))
        np.add.at(h, (a, a), c)
        np.add.at(h, (b, b), c)
        np.add.at(h, (a, b), -c)
        np.add.at(h, (b, a), -c)
        rhs = g + 2 * lam * alpha
        step = np.linalg.solve(h @ k + 2 * lam * np.eye(n), rhs)
        t = 1.0
        while t > 1e-6:
            new = alpha - t * step
            f_new = value(new)
            if f_new <= f - 1e-4 * t * float(rhs @ (k @ step)):
                break
            t *= 0.5
        if t <= 1e-6 or f - f_new < 1e-12 * max(1.0, abs(f)):
            if t > 1e-6:
                alpha, f = new, f_new
            break
        alpha, f = new, f_new
    return alpha


@torch.no_grad()
def predict(head: Head, features: torch.Tensor) -> np.ndarray:
    """The head's scores for ``features`` as float64 NumPy (no dropout: eval mode)."""
    head.eval()
    return head(features).score.double().numpy()
