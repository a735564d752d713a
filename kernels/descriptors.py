"""Descriptors of one window spectrum (numpy only: the tap and the sidecar share it).

Input: the eigenvalues of S = Xc Xcᵀ / d for a window X of W token rows and
width d, centred over tokens (Xc = X − mean row). Centring removes one degree
of freedom, so S has p = min(W−1, d) non-zero eigenvalues and the MP ratio is
γ = (W−1)/d.

Zero-variance windows (all rows equal, trace 0) have no spectrum to speak of;
they get a defined result instead of NaN: every eigenvalue-derived value 0,
λ1/λ2 = 1, spikes 0 (documented in DESCRIPTOR_DOCS).
"""

from __future__ import annotations

import numpy as np

from . import rmt

DESCRIPTOR_DOCS: dict[str, str] = {
    "lambda1": "largest eigenvalue of the centred window Gram / d",
    "lambda1_rel": "λ1 over the mean non-zero eigenvalue",
    "lambda2_rel": "λ2 over the mean non-zero eigenvalue",
    "lambda3_rel": "λ3 over the mean non-zero eigenvalue (0 when W < 4)",
    "gap12_rel": "(λ1 − λ2) over the mean non-zero eigenvalue",
    "ratio12": "λ1 / λ2 (1 for a zero-variance window; λ2 floored at 1e-12·λ1)",
    "spectral_entropy": "Shannon entropy (nats) of λ / Σλ over the non-zero eigenvalues",
    "effective_rank": "exp(spectral_entropy)",
    "eig_variance_rel": "variance of the non-zero eigenvalues over their squared mean",
    "trace_mean": "mean non-zero eigenvalue (total variance per component)",
    "sigma2": "robust noise variance: median eigenvalue over the MP median (Gavish–Donoho)",
    "mp_edge": "upper MP bulk edge σ²(1+√γ)² for this window's own σ²",
    "spikes": "number of eigenvalues above mp_edge",
    "gamma": "MP ratio γ = (W−1)/d",
    "window": "rows W in the window",
}
DESCRIPTOR_NAMES: tuple[str, ...] = tuple(DESCRIPTOR_DOCS)
INDEX = {name: i for i, name in enumerate(DESCRIPTOR_NAMES)}

# Below this fraction of λ1 an eigenvalue is numerically zero (fp64 Gram).
_REL_ZERO = 1e-12


def mp_gamma(window: int, dim: int) -> float:
    if window < 2:
        raise ValueError(f"window: a spectrum needs at least 2 rows, got {window}")
    if dim < 1:
        raise ValueError(f"dim: must be >= 1, got {dim}")
    return (window - 1) / dim


def describe(eigs, window: int, dim: int) -> np.ndarray:
    """eigs: [W] eigenvalues (any order) -> [len(DESCRIPTOR_NAMES)] float64."""
    gamma = mp_gamma(window, dim)
    lam = np.sort(np.asarray(eigs, dtype=np.float64))[::-1]
    if lam.ndim != 1 or lam.size != window:
        raise ValueError(f"eigs: expected {window} eigenvalues (one per window row), got shape {lam.shape}")
    if not np.all(np.isfinite(lam)):
        raise ValueError("eigs: contains NaN or Inf")
    scale = max(lam[0], 0.0)
    if lam[-1] < -1e-6 * max(scale, 1e-30):
        raise ValueError(f"eigs: a Gram spectrum is non-negative, got {lam[-1]!r}")
    lam = np.clip(lam, 0.0, None)
    lam[lam < _REL_ZERO * scale] = 0.0  # rounding noise of a rank-deficient window
    p = min(window - 1, dim)
    nz = lam[:p]

    out = np.zeros(len(DESCRIPTOR_NAMES), dtype=np.float64)
    out[INDEX["gamma"]] = gamma
    out[INDEX["window"]] = window
    out[INDEX["ratio12"]] = 1.0
    total = nz.sum()
    if total <= 0.0 or scale <= 0.0:
        return out  # zero-variance window: the documented all-zero result

    mean = total / p
    padded = np.concatenate([nz, np.zeros(3)])
    out[INDEX["lambda1"]] = nz[0]
    out[INDEX["lambda1_rel"]] = nz[0] / mean
    out[INDEX["lambda2_rel"]] = padded[1] / mean
    out[INDEX["lambda3_rel"]] = padded[2] / mean
    out[INDEX["gap12_rel"]] = (nz[0] - padded[1]) / mean
    out[INDEX["ratio12"]] = nz[0] / max(padded[1], _REL_ZERO * nz[0])
    prob = nz / total
    prob = prob[prob > 0]
    entropy = float(-(prob * np.log(prob)).sum())
    out[INDEX["spectral_entropy"]] = entropy
    out[INDEX["effective_rank"]] = np.exp(entropy)
    out[INDEX["eig_variance_rel"]] = nz.var() / mean**2
    out[INDEX["trace_mean"]] = mean
    sigma2 = rmt.sigma2_median(nz, gamma)
    edge = rmt.mp_edges(gamma, sigma2)[1]
    out[INDEX["sigma2"]] = sigma2
    out[INDEX["mp_edge"]] = edge
    out[INDEX["spikes"]] = float(np.count_nonzero(nz > edge))
    return out


def count_spikes(eigs, window: int, dim: int, sigma2: float) -> int:
    """Eigenvalues above the MP edge for a given (e.g. calibrated) σ²."""
    edge = rmt.mp_edges(mp_gamma(window, dim), sigma2)[1]
    return int(np.count_nonzero(np.asarray(eigs, dtype=np.float64) > edge))
