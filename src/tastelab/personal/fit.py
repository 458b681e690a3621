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
from typing import Any

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
             targets: np.ndarray | None = None, seed: int = 0, solver: str = "auto",
             offset: np.ndarray | None = None) -> Head:
    """Fit a head on ``features`` (all images, ``(N, D)``): input statistics from ``fit_images`` only (the
    training images: held-out images never shape the model), loss from ``pairs`` (Bradley-Terry on score
    differences) or ``targets`` (MSE on ``fit_images``, per-image scores aligned with ``fit_images``).
    ``solver``: a linear head's system, "auto" (:func:`use_primal`), "dual" or "primal" (same optimum).

    ``offset`` (linear heads only; one value per row of ``features``): a fixed score added to the head's, so
    the head learns the residual (the model is offset + head, the L2 pulls it towards the offset alone):
    for votes the logit of (a, b) is head_a - head_b + offset_a - offset_b; for scores the ridge target is
    the label minus the offset. How a prior becomes the starting point of a personal model
    (:mod:`tastelab.personal.prior`)."""
    if (pairs is None) == (targets is None):
        raise ValueError("fit_head: give pairs or targets")
    if offset is not None:
        if spec.hidden:
            raise ValueError("fit_head: an offset is only for linear heads")
        offset = np.asarray(offset, dtype=np.float64)
        if offset.shape != (features.shape[0],) or not np.isfinite(offset).all():
            raise ValueError(f"fit_head: offset must be {features.shape[0]} finite values, one per row")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = Head(features.shape[1], spec.config())
    x_fit = features[torch.as_tensor(fit_images, dtype=torch.long)]
    head.set_input_stats(x_fit)
    if not spec.hidden:
        _fit_linear(head, features, spec.lam, fit_images=fit_images, pairs=pairs, targets=targets, solver=solver,
                    offset=offset)
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
    function at a fraction of the cost. With n >= D there is nothing to save (and the SVD costs n D^2): the
    fit runs on the inputs themselves."""
    z = (features.float() - head.feature_mean) / head.feature_std
    rows = np.unique(np.concatenate([pairs.a, pairs.b])) if pairs is not None else np.asarray(fit_images)
    x = z[torch.as_tensor(rows, dtype=torch.long)]  # (n, D): the training rows
    basis: torch.Tensor | None = None
    if len(rows) < z.shape[1]:
        _, sv, vt = torch.linalg.svd(x.double(), full_matrices=False)
        basis = vt[sv > sv.max() * 1e-7].T.float()  # (D, r)
        x = x @ basis  # (n, r): the training rows in the basis
    first = head.mlp[0]
    assert isinstance(first, nn.Linear)
    reduced = first if basis is None else nn.Linear(basis.shape[1], first.out_features)
    last = head.mlp[-1]
    assert isinstance(last, nn.Linear)
    small = nn.Sequential(reduced, *list(head.mlp)[1:])
    if basis is not None:
        with torch.no_grad():
            reduced.weight.copy_(first.weight @ basis)
            reduced.bias.copy_(first.bias)
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
    if basis is not None:
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


#: The solver rule: the primal when there are more than this many training rows per feature.
PRIMAL_ROWS_PER_FEATURE = 2


def use_primal(n_rows: int, dim: int) -> bool:
    """The size rule of linear fits: solve over the ``dim`` weights (primal, D x D systems) when there are more
    than :data:`PRIMAL_ROWS_PER_FEATURE` x D training rows, else over the ``n_rows`` rows (dual, n x n
    systems). Same objective, same optimum (the Newton iterates are the same, w = Z^T alpha). A Bradley-Terry
    Newton step costs about 2/3 n^3 in the dual (an LU of n x n; the vote Hessian is applied sparsely) and
    2 n D^2 + D^3 / 3 in the primal (Z^T H Z and a Cholesky of D x D): they cross near n = 1.8 D. Memory:
    n^2 vs D^2 doubles (beside the n x D rows both keep), so 16,000 rows (4,000 images x 4 views) of 3,456
    features is a 3,456-wide solve (95 MB per matrix), not a 16,000-wide one (2 GB per matrix, minutes per
    step)."""
    return n_rows > PRIMAL_ROWS_PER_FEATURE * dim


def _fit_linear(head: Head, features: torch.Tensor, lam: float, *, fit_images: np.ndarray, pairs: Pairs | None,
                targets: np.ndarray | None, solver: str = "auto", offset: np.ndarray | None = None) -> None:
    """Linear heads, solved exactly: ridge in closed form, Bradley-Terry by damped Newton steps, either in the
    dual (w = Z^T alpha over the n training rows) or the primal (over the D weights), by :func:`use_primal`
    unless ``solver`` is "dual" or "primal". Deterministic, a few matrix solves, then written into the head's
    one Linear layer. ``offset`` (:func:`fit_head`): added to the scores inside the loss; the Gram matrices
    do not depend on it, so an offset grid reuses the memo."""
    if solver not in ("auto", "dual", "primal"):
        raise ValueError(f"solver must be auto, dual or primal, got {solver!r}")
    rows = np.unique(np.concatenate([pairs.a, pairs.b])) if pairs is not None else np.asarray(fit_images)
    primal = use_primal(len(rows), features.shape[1]) if solver == "auto" else solver == "primal"
    if pairs is not None:
        remap = np.full(len(features), -1)
        remap[rows] = np.arange(len(rows))
        ra, rb = remap[pairs.a], remap[pairs.b]
        o = None if offset is None else offset[rows]
        if primal:
            zu, _ = _gram(features, head, fit_images, rows, primal=True)
            weight = _bt_primal(zu, ra, rb, pairs.wa, pairs.wb, lam, offset=o)
        else:
            zu, k = _gram(features, head, fit_images, rows)
            weight = zu.T @ _bt_dual(k, ra, rb, pairs.wa, pairs.wb, lam, offset=o)
        bias = 0.0
    else:
        assert targets is not None
        zf, k = _gram(features, head, fit_images, rows, primal=primal)
        y = np.asarray(targets, dtype=np.float64)
        if offset is not None:  # ridge on the residual: the head fits what the offset leaves
            y = y - offset[np.asarray(fit_images, dtype=np.int64)]
        n = len(y)
        var = float(y.var(ddof=1)) if n > 1 and y.var() > 0 else 1.0
        # min mean((Zw + b - y)^2) / var + lam |w|^2: columns of Z are centred on these images, so b = mean(y)
        # and w = Z^T (K + lam n var I)^-1 (y - mean y) = (Z^T Z + lam n var I)^-1 Z^T (y - mean y).
        if primal:
            weight = _solve_spd(k + lam * n * var * np.eye(len(k)), zf.T @ (y - y.mean()))
        else:
            weight = zf.T @ _solve_spd(k + lam * n * var * np.eye(n), y - y.mean())
        bias = float(y.mean())
    linear = head.mlp[-1]
    assert isinstance(linear, nn.Linear)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32)[None])
        linear.bias.fill_(bias)


def _solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve a symmetric positive definite system (Cholesky; LU when rounding makes it fail)."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve

    try:
        return cho_solve(cho_factor(a, lower=True, overwrite_a=False, check_finite=False), b, check_finite=False)
    except LinAlgError:
        return np.linalg.solve(a, b)


#: Standardised rows and their Gram matrix (dual) or Z^T Z (primal) for the last few (features, training
#: rows): an L2 grid refits the same folds once per strength, and these products are most of a linear fit's
#: cost. Bounded by bytes as well as entries: at 16,000 rows one n x n Gram matrix alone is 2 GB.
_GRAMS: OrderedDict[tuple[int, bytes, bytes, bool], tuple[torch.Tensor, np.ndarray, np.ndarray]] = OrderedDict()
GRAM_CACHE_SIZE = 12
GRAM_CACHE_BYTES = 1 << 30


def _gram(features: torch.Tensor, head: Head, fit_images: np.ndarray, rows: np.ndarray, *, primal: bool = False
          ) -> tuple[np.ndarray, np.ndarray]:
    """Standardised ``rows`` of ``features`` (statistics of ``fit_images``, already in ``head``) and their
    Gram matrix ``Z Z^T`` (or ``Z^T Z`` when ``primal``), memoised. The key holds the tensor's identity; the
    entry holds the tensor itself, so that identity cannot be reused by another tensor while the entry lives."""
    key = (id(features), np.asarray(fit_images, dtype=np.int64).tobytes(), np.asarray(rows, dtype=np.int64).tobytes(),
           primal)
    hit = _GRAMS.get(key)
    if hit is not None and hit[0] is features:
        _GRAMS.move_to_end(key)
        return hit[1], hit[2]
    idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    z = ((features[idx].double() - head.feature_mean.double()) / head.feature_std.double()).numpy()
    k = z.T @ z if primal else z @ z.T
    _GRAMS[key] = (features, z, k)
    while len(_GRAMS) > 1 and (len(_GRAMS) > GRAM_CACHE_SIZE
                               or sum(int(e[1].nbytes) + int(e[2].nbytes) for e in _GRAMS.values()) > GRAM_CACHE_BYTES):
        _GRAMS.popitem(last=False)
    return z, k


def _bt_terms(s: np.ndarray, a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray, total: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Bradley-Terry's gradient in the scores ``s`` and its curvature per vote (d2L / dd2, d = s_a - s_b)."""
    from scipy.special import expit

    n = len(s)
    p = expit(s[a] - s[b])
    coef = (-(wa * (1 - p)) + wb * p) / total  # dL/dd
    g = np.bincount(a, coef, n) - np.bincount(b, coef, n)
    return g, (wa + wb) * p * (1 - p) / total


def _bt_loss(s: np.ndarray, a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray, total: float) -> float:
    from scipy.special import log_expit

    d = s[a] - s[b]
    return float(-(wa * log_expit(d) + wb * log_expit(-d)).sum() / total)


def _vote_laplacian(c: np.ndarray, a: np.ndarray, b: np.ndarray, n: int) -> Any:
    """The Bradley-Terry loss's Hessian in scores: a graph Laplacian over the votes with edge weights ``c``,
    sparse (a dense n x n matrix would cost as much memory as the Gram matrix)."""
    from scipy.sparse import coo_matrix

    return coo_matrix((np.concatenate([c, c, -c, -c]), (np.concatenate([a, b, a, b]), np.concatenate([a, b, b, a]))),
                      shape=(n, n)).tocsr()


def _damped_newton(x0: np.ndarray, value: Callable[[np.ndarray], float],
                   direction: Callable[[np.ndarray], tuple[np.ndarray, float]], max_iter: int) -> np.ndarray:
    """Newton's method with Armijo backtracking, shared by the primal and dual Bradley-Terry solves so both
    take the same iterates: ``direction(x)`` gives the Newton step and its slope (gradient . step); stop when
    a step no longer decreases ``value`` by a relative 1e-12 or backtracking fails."""
    x, f = x0, value(x0)
    for _ in range(max_iter):
        step, slope = direction(x)
        t, new, f_new = 1.0, x, f
        while t > 1e-6:
            new = x - t * step
            f_new = value(new)
            if f_new <= f - 1e-4 * t * slope:
                break
            t *= 0.5
        if t <= 1e-6 or f - f_new < 1e-12 * max(1.0, abs(f)):
            if t > 1e-6:
                x = new
            break
        x, f = new, f_new
    return x


def _bt_primal(z: np.ndarray, a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray, lam: float,
               max_iter: int = 50, offset: np.ndarray | None = None) -> np.ndarray:
    """Bradley-Terry with L2 on w directly: minimise L(Z w + o) + lam |w|^2 by Newton steps
    (Z^T H Z + 2 lam I) step = Z^T g + 2 lam w (:func:`_damped_newton`, as the dual);
    H (the loss's Hessian in scores) is a weighted graph Laplacian over the votes, applied sparsely.
    ``offset`` o: fixed scores of the rows (default 0)."""
    n, dim = z.shape
    total = float((wa + wb).sum())
    o = np.zeros(n) if offset is None else np.asarray(offset, dtype=np.float64)

    def value(w: np.ndarray) -> float:
        return _bt_loss(z @ w + o, a, b, wa, wb, total) + lam * float(w @ w)

    def direction(w: np.ndarray) -> tuple[np.ndarray, float]:
        g_s, c = _bt_terms(z @ w + o, a, b, wa, wb, total)
        h = _vote_laplacian(c, a, b, n)
        grad = z.T @ g_s + 2 * lam * w
        step = _solve_spd(z.T @ (h @ z) + 2 * lam * np.eye(dim), grad)
        return step, float(grad @ step)

    return _damped_newton(np.zeros(dim), value, direction, max_iter)


def _bt_dual(k: np.ndarray, a: np.ndarray, b: np.ndarray, wa: np.ndarray, wb: np.ndarray, lam: float,
             max_iter: int = 50, offset: np.ndarray | None = None) -> np.ndarray:
    """Bradley-Terry with L2 on w = Z^T alpha: minimise L(K alpha + o) + lam alpha^T K alpha by Newton steps
    (H K + 2 lam I) step = g + 2 lam alpha (:func:`_damped_newton`); H, g: the loss's Hessian / gradient in
    scores (H applied sparsely: a dense n x n H costs as much memory as K). ``offset`` o: fixed scores of
    the rows (default 0); the optimum's w still lies in the span of the rows, so the dual stays exact."""
    n = len(k)
    total = float((wa + wb).sum())
    o = np.zeros(n) if offset is None else np.asarray(offset, dtype=np.float64)

    def value(alpha: np.ndarray) -> float:
        s = k @ alpha
        return _bt_loss(s + o, a, b, wa, wb, total) + lam * float(alpha @ s)

    def direction(alpha: np.ndarray) -> tuple[np.ndarray, float]:
        g, c = _bt_terms(k @ alpha + o, a, b, wa, wb, total)
        rhs = g + 2 * lam * alpha
        step = np.linalg.solve(_vote_laplacian(c, a, b, n) @ k + 2 * lam * np.eye(n), rhs)
        return step, float(rhs @ (k @ step))

    return _damped_newton(np.zeros(n), value, direction, max_iter)


@torch.no_grad()
def predict(head: Head, features: torch.Tensor) -> np.ndarray:
    """The head's scores for ``features`` as float64 NumPy (no dropout: eval mode)."""
    head.eval()
    return head(features).score.double().numpy()
