"""FID and KID against independent float64 oracles on fresh random inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import linalg

from evals.fid import feature_statistics, fid_from_features, frechet_distance, kernel_distance, polynomial_mmd


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.1 * np.eye(dim)


def fid_by_eigenvalues(mu1, sigma1, mu2, sigma2) -> float:
    """Oracle: tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), a symmetric PSD matrix (eigh, no sqrtm)."""
    values, vectors = linalg.eigh(sigma1)
    root1 = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def test_fid_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(1).normal(size=(300, 16))
    # sqrtm of a PSD product is accurate to ~1e-10 relative on 16 dims; trace(S) ~ 16.
    assert abs(fid_from_features(features, features)) < 1e-6


def test_frechet_distance_matches_an_eigenvalue_oracle():
    rng = np.random.default_rng(2)
    for dim in (3, 12, 40):
        mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
        s1, s2 = random_covariance(rng, dim), random_covariance(rng, dim)
        expected = fid_by_eigenvalues(mu1, s1, mu2, s2)
        # Both are float64 routes to the same trace; well-conditioned inputs agree to ~1e-9 relative.
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-9)


def test_fid_from_features_uses_unbiased_statistics():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(50, 5)), rng.normal(1.0, 2.0, size=(60, 5))
    mu_a, cov_a = feature_statistics(a)
    assert np.allclose(cov_a, np.cov(a.T, ddof=1))
    expected = fid_by_eigenvalues(mu_a, cov_a, b.mean(0), np.cov(b.T, ddof=1))
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-7)


def test_singular_covariances_give_a_finite_distance():
    # Fewer samples than dimensions: both covariances are rank-deficient and sqrtm may fail;
    # the eps*I retry must still give the regularised distance.
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 20)), rng.normal(size=(6, 20)) + 0.5
    value = fid_from_features(a, b)
    mu_a, cov_a = feature_statistics(a)
    mu_b, cov_b = feature_statistics(b)
    assert np.isfinite(value)
    # The eps=1e-6 offset moves the trace by O(sqrt(eps) * dim) at most.
    assert value == pytest.approx(fid_by_eigenvalues(mu_a, cov_a, mu_b, cov_b), abs=0.05)


def test_nearly_singular_covariances_are_regularised_not_refused():
    """64 samples of 128 scaled features (fewer samples than dimensions, as the demo's eval has: 64 of
    288): plain sqrtm leaves an imaginary part above tolerance; the eps*I retry must give the distance."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        a = rng.normal(size=(64, 128)) @ rng.normal(size=(128, 128)) * rng.uniform(0.01, 3, size=128)
        b = rng.normal(size=(64, 128)) @ rng.normal(size=(128, 128))
        mu_a, cov_a = feature_statistics(a)
        mu_b, cov_b = feature_statistics(b)
        plain = linalg.sqrtm(cov_a @ cov_b)
        if np.iscomplexobj(plain) and np.abs(np.diagonal(plain).imag).max() > 1e-3:
            break
    else:
        pytest.fail("no nearly singular case drawn: the test no longer exercises the retry")
    expected = fid_by_eigenvalues(mu_a, cov_a, mu_b, cov_b)
    # The traces are ~1e4 here; eps = 1e-6 moves tr(sqrt) by O(sqrt(eps) * dim) ~ 0.1, i.e. ~1e-5 relative.
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-4)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def mmd_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Oracle: the unbiased MMD^2 written out pair by pair."""
    m, d = x.shape
    k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3
    pairs = list(itertools.permutations(range(m), 2))
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / len(pairs)
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return within - 2 * across


def test_polynomial_mmd_matches_the_pairwise_definition():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(9, 4)), rng.normal(0.3, 1.2, size=(9, 4))
    assert polynomial_mmd(x, y) == pytest.approx(mmd_by_loops(x, y), rel=1e-10)


def test_kid_is_unbiased_on_halves_of_one_set_and_positive_for_shifted_sets():
    rng = np.random.default_rng(7)
    means = []
    for trial in range(20):
        features = rng.normal(size=(400, 8))
        halves = rng.permutation(400)
        mean, _ = kernel_distance(
            features[halves[:200]], features[halves[200:]], num_subsets=10, subset_size=100, seed=trial
        )
        means.append(mean)
    # An unbiased estimator averages to 0 over independent draws: within 4 standard errors.
    assert abs(np.mean(means)) < 4 * np.std(means) / np.sqrt(len(means))
    shifted_mean, _ = kernel_distance(
        rng.normal(size=(200, 8)), rng.normal(0.5, 1.0, size=(200, 8)), num_subsets=10, subset_size=100
    )
    # A mean shift of half a standard deviation lies far outside the null spread of the estimate.
    assert shifted_mean > 10 * np.std(means)
