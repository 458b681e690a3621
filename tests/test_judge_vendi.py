"""Vendi score by its definition: exp of the entropy of the eigenvalues of K/n, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tastelab.judge.vendi import relative_vendi, vendi_from_similarity, vendi_score


def _shannon_exp(p: list[float]) -> float:
    return math.exp(-sum(x * math.log(x) for x in p if x > 0))


@pytest.mark.parametrize("n", [1, 2, 5])
def test_identity_kernel_gives_n(n: int) -> None:
    assert vendi_from_similarity(np.eye(n)) == pytest.approx(n)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_all_ones_kernel_gives_one(n: int) -> None:
    assert vendi_from_similarity(np.ones((n, n))) == pytest.approx(1.0)


@pytest.mark.parametrize("s", [0.0, 0.3, 0.9, -0.5, 1.0])
def test_two_items_with_similarity_s(s: float) -> None:
    expected = _shannon_exp([(1 + s) / 2, (1 - s) / 2])
    assert vendi_from_similarity(np.array([[1.0, s], [s, 1.0]])) == pytest.approx(expected)


def test_two_duplicates_and_one_distinct_item() -> None:
    # eigenvalues of K/3 are 2/3 and 1/3: the three items count as ~1.89 distinct ones
    k = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float)
    assert vendi_from_similarity(k) == pytest.approx(_shannon_exp([2 / 3, 1 / 3]))


def test_embeddings_orthogonal_duplicate_and_single() -> None:
    assert vendi_score(np.eye(4) * 3.0) == pytest.approx(4.0)  # scale does not matter (cosine)
    assert vendi_score(np.tile([[0.2, -1.0, 3.0]], (6, 1))) == pytest.approx(1.0)
    assert vendi_score(np.array([[1.0, 2.0]])) == pytest.approx(1.0)
    # two vectors at 60 degrees: cosine similarity 0.5
    x = np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert vendi_score(x) == pytest.approx(_shannon_exp([0.75, 0.25]))


def test_order_q_variants() -> None:
    k = np.array([[1.0, 0.5], [0.5, 1.0]])  # eigenvalues of K/2: 0.75, 0.25
    assert vendi_from_similarity(k, q=2) == pytest.approx(1 / (0.75**2 + 0.25**2))
    assert vendi_from_similarity(k, q=math.inf) == pytest.approx(1 / 0.75)
    assert vendi_from_similarity(k, q=0) == pytest.approx(2.0)
    assert vendi_from_similarity(k, q=0.5) == pytest.approx((math.sqrt(0.75) + math.sqrt(0.25)) ** 2)
    assert vendi_from_similarity(np.eye(3), q=2) == pytest.approx(3.0)


@pytest.mark.parametrize(("k", "message"), [
    (np.array([[2.0, 0.0], [0.0, 2.0]]), "unit diagonal"),
    (np.array([[1.0, 0.2], [0.5, 1.0]]), "symmetric"),
    (np.array([[1.0, 1.0, -1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]]), "positive semi-definite"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), "non-finite"),
    (np.zeros((0, 0)), "non-empty"),
])
def test_invalid_similarity_matrices_are_errors(k: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vendi_from_similarity(k)


def test_invalid_embeddings_are_errors() -> None:
    with pytest.raises(ValueError, match="all zeros"):
        vendi_score(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        vendi_score(np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="order q"):
        vendi_score(np.eye(2), q=-1)


def test_relative_vendi_spans_zero_to_one() -> None:
    assert relative_vendi(np.tile([[1.0, 2.0, 3.0]], (4, 1))) == pytest.approx(0.0)
    assert relative_vendi(np.eye(5)) == pytest.approx(1.0)
    k_half = _shannon_exp([0.75, 0.25])
    assert relative_vendi(np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])) == pytest.approx(k_half - 1.0)
    assert math.isnan(relative_vendi(np.array([[1.0, 0.0]])))  # one seed: no diversity to measure, not 0
