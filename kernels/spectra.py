"""Window spectra in plain torch: one request's window -> eigenvalues.

This is the small, correct reference path. The batched, incremental and GPU
paths (issue: spectral kernels) must match it.
"""

from __future__ import annotations

import torch


def _centred_gram(window: torch.Tensor) -> torch.Tensor:
    """window: [W, d] -> [W, W] float64 Xc Xcᵀ / d (Xc centred over tokens), on CPU."""
    if window.ndim != 2:
        raise ValueError(f"window: expected a [W, d] matrix, got shape {tuple(window.shape)}")
    w, d = window.shape
    if w < 2:
        raise ValueError(f"window: a spectrum needs at least 2 rows, got W={w}")
    if d < 1:
        raise ValueError("window: rows have width 0")
    x = window.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("window: contains NaN or Inf activations")
    # Shift by the first row before centring (same Xc in exact arithmetic): equal
    # rows then centre to exactly 0, so a zero-variance window has a zero spectrum
    # even for float64 inputs, whose mean is not exact.
    x = x - x[:1]
    xc = x - x.mean(dim=0, keepdim=True)  # [W, d]
    return (xc @ xc.T) / d  # [W, W]


def window_eigenvalues(window: torch.Tensor) -> torch.Tensor:
    """window: [W, d] -> [W] float64, descending eigenvalues of Xc Xcᵀ / d.

    Xc is the window centred over tokens. The W×W Gram (not the d×d
    covariance) is what we decompose: W ≤ 64 ≪ d for every model we watch.
    """
    gram = _centred_gram(window)
    eigs = torch.linalg.eigvalsh(gram)  # ascending
    return eigs.flip(0).clamp_min(0.0)


def window_spectrum(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """window: [W, d] -> (eigs [W] float64 descending, row_sq_norms [W] float64).

    eigs are exactly `window_eigenvalues(window)`; row_sq_norms[i] = ‖Xc_i‖²/d,
    the diagonal of the same centred Gram (row order of the window), so that
    Σ row_sq_norms = trace = Σ eigs. Feed both to
    `descriptors.describe(eigs, W, d, row_sq_norms=row_sq_norms)`.
    """
    gram = _centred_gram(window)
    eigs = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    return eigs, torch.diagonal(gram).clone()
