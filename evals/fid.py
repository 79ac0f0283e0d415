"""Fréchet and kernel inception distances between two sets of feature vectors.

Both follow clean-fid (Parmar et al. 2022) and torch-fidelity, so numbers are comparable with theirs
given the same features: FID in float64 through ``scipy.linalg.sqrtm``, retried with ``eps * I`` on
both covariances when the product is singular or nearly so (``sqrtm`` returns non-finite values, or an
imaginary part above clean-fid's tolerance), and a complex result accepted only when its imaginary
part is then numerical noise. KID is the unbiased MMD^2 with the
cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (mean and std).
Which features go in is the caller's choice (``evals.features``); these functions only do the maths.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

# clean-fid's tolerance on the diagonal's imaginary part: anything larger is not rounding noise.
IMAGINARY_TOLERANCE = 1e-3


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``ddof=1``) covariance of ``(N, D)`` features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _imaginary_part(matrix: np.ndarray) -> float:
    """Largest imaginary part on the diagonal (0 for a real matrix)."""
    return float(np.abs(np.diagonal(matrix).imag).max()) if np.iscomplexobj(matrix) else 0.0


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians, in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, "
            f"sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all() or _imaginary_part(covmean) > IMAGINARY_TOLERANCE:
        # A singular or near-singular product (fewer samples than dimensions: the demo's 64 samples of
        # 288 judge features gave a 0.0036 imaginary part): regularise both, as clean-fid does.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if _imaginary_part(covmean) > IMAGINARY_TOLERANCE:
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) has an imaginary part of {np.abs(covmean.imag).max():.3g}: "
                "the covariances are not valid (not symmetric positive semi-definite?)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two ``(N, D)`` feature sets."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-sized ``x`` and ``y`` with ``k(a, b) = (a.b / d + 1)^3``."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    # The unbiased estimator leaves out each set's diagonal (k(x_i, x_i)).
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kernel_distance(
    a: np.ndarray, b: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and std of the unbiased polynomial MMD^2 over ``num_subsets`` random equal subsets."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {a.shape} and {b.shape}")
    size = min(len(a), len(b), subset_size)
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    values = [
        polynomial_mmd(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
        for _ in range(num_subsets)
    ]
    return float(np.mean(values)), float(np.std(values))
