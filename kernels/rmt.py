"""Marchenko–Pastur (MP) law for sample-covariance spectra (numpy, float64).

Convention: X is p×n with i.i.d. entries of variance σ²; S = X Xᵀ / n has
eigenvalues that, for p, n → ∞ with γ = p/n, follow MP(γ, σ²) with bulk on
[σ²(1−√γ)², σ²(1+√γ)²]. For γ > 1, S has p−n zero eigenvalues and the law
has a point mass 1−1/γ at 0; the functions below describe the continuous
(non-zero) part, normalised to mass 1.

A window of W token rows of width d, centred over tokens, is p = W−1, n = d.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not np.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma: must be a finite ratio p/n > 0, got {gamma!r}")
    return gamma


def mp_edges(gamma: float, sigma2: float = 1.0) -> tuple[float, float]:
    """Bulk edges (λ−, λ+) of MP(γ, σ²)."""
    gamma = _check_gamma(gamma)
    s = np.sqrt(gamma)
    return sigma2 * (1.0 - s) ** 2, sigma2 * (1.0 + s) ** 2


def mp_density(x, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """Density of the non-zero part of MP(γ, σ²), integrating to 1 on the bulk."""
    gamma = _check_gamma(gamma)
    x = np.asarray(x, dtype=np.float64)
    lo, hi = mp_edges(gamma, sigma2)
    inside = (x > lo) & (x < hi)
    xs = np.where(inside, x, 1.0)
    dens = np.sqrt(np.clip((hi - xs) * (xs - lo), 0.0, None)) / (2.0 * np.pi * sigma2 * gamma * xs)
    # For γ > 1 the continuous part has mass 1/γ; renormalise it to 1.
    dens = dens * max(gamma, 1.0)
    return np.where(inside, dens, 0.0)


@lru_cache(maxsize=256)
def _unit_cdf_table(gamma: float, n: int = 4097) -> tuple[np.ndarray, np.ndarray]:
    # Nodes x = lo + (hi−lo)·sin²(θ/2) on a uniform θ grid (Chebyshev-spaced):
    # they cluster at both square-root edges, where the density bends.
    lo, hi = mp_edges(gamma, 1.0)
    theta = np.linspace(0.0, np.pi, n)
    t = 0.5 - 0.5 * np.cos(theta)
    x = lo + (hi - lo) * t
    # Integrate in θ (dx = (hi−lo)/2·sinθ dθ, midpoint rule): the integrand is
    # smooth there even at γ ≈ 1, where the density itself diverges like x^(-1/2)
    # at λ− = 0 and a trapezoid in x (f(λ−) = 0) loses ~2e-4 of mass.
    mid = 0.5 * (theta[1:] + theta[:-1])
    g = mp_density(lo + (hi - lo) * (0.5 - 0.5 * np.cos(mid)), gamma, 1.0) * (0.5 * (hi - lo) * np.sin(mid))
    cdf = np.concatenate([[0.0], np.cumsum(g) * (theta[1] - theta[0])])
    cdf /= cdf[-1]
    return x, cdf


def mp_cdf(x, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """CDF of the non-zero part of MP(γ, σ²)."""
    gamma = _check_gamma(gamma)
    grid, cdf = _unit_cdf_table(round(gamma, 12))
    return np.interp(np.asarray(x, dtype=np.float64) / sigma2, grid, cdf, left=0.0, right=1.0)


def mp_quantile(q, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """Quantile function of the non-zero part of MP(γ, σ²)."""
    gamma = _check_gamma(gamma)
    q = np.asarray(q, dtype=np.float64)
    if not np.all((q >= 0) & (q <= 1)):  # also rejects NaN
        raise ValueError(f"q: quantiles must lie in [0, 1], got {q!r}")
    grid, cdf = _unit_cdf_table(round(gamma, 12))
    return sigma2 * np.interp(q, cdf, grid)


def sigma2_median(eigs, gamma: float) -> float:
    """Robust σ²: median non-zero eigenvalue over the MP median (Gavish–Donoho
    style). A few spikes move the median by a rank or two, not by their size."""
    eigs = np.asarray(eigs, dtype=np.float64)
    if eigs.size == 0:
        raise ValueError("eigs: need at least one eigenvalue to estimate sigma2")
    return float(np.median(eigs) / mp_quantile(0.5, gamma))
