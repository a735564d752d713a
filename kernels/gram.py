"""The spectrum of a window, from its raw Gram: the one place eigenvalues of a
window are computed (both taps, offline and live, CPU and GPU).

A window of V token rows x_1..x_V of width d is described by the eigenvalues of
its token-centred Gram divided by d, S = H G H / d with G = X Xᵀ and
H = I − 11ᵀ/V (centring over tokens). Callers keep G incrementally
(kernels/window_bank.py) in a W×W buffer whose leading V×V block is in use;
the rest is ignored. Ring order does not matter: a permutation of the rows does
not change the eigenvalues.

`spectra` is batched over many windows at once, one eigensolve for all of
them. The backend is chosen in kernels/backend.py: torch's float64 `eigvalsh`
(CPU default), or on CUDA the Triton Jacobi eigensolver
(kernels/triton_eigvalsh.py, float32, no host synchronisation).
"""

from __future__ import annotations

import torch

from . import backend


def centre(gram: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """gram: [B, W, W] raw inner products; valid: [B] int rows in use.
    Returns H·G·H on each valid block in float64, zeros elsewhere: [B, W, W]."""
    b, w, _ = gram.shape
    g = gram.to(torch.float64)
    valid = valid.to(device=gram.device, dtype=torch.int64)
    inside = torch.arange(w, device=gram.device)[None, :] < valid[:, None]  # [B, W]
    block = inside[:, :, None] & inside[:, None, :]  # [B, W, W]
    # where, not a product with a 0/1 mask: entries outside the block may hold
    # anything (a reused slot's stale NaN row), and NaN·0 is NaN.
    g = torch.where(block, g, 0.0)
    n = valid.to(g.dtype).clamp_min(1)[:, None]  # [B, 1]
    row_mean = g.sum(-1) / n  # [B, W]
    total = row_mean.sum(-1, keepdim=True) / n  # [B, 1]
    c = g - row_mean[:, :, None] - row_mean[:, None, :] + total[:, :, None]
    return torch.where(block, c, 0.0)


def spectra(gram: torch.Tensor, valid, scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues of many windows at once.

    gram: [B, W, W] raw Grams (float32 or float64); valid: [B] ints, or one
    int for all; scale: [B] or one float, the factor applied to the centred
    Gram: 1/d for the spectrum of Xc Xcᵀ / d (with a random projection to k
    dims still 1/d, so σ² keeps its units; the MP ratio then uses k).
    Returns (eigs [B, W] descending, clamped at 0, zeros past each valid count;
    row_sq [B, W] the diagonal of the scaled centred Gram, ‖Xc_i‖²·scale;
    ok [B] bool, False where the window holds NaN/Inf). float64 on the torch
    backend, float32 on the Triton one; on the gram's device.
    """
    if gram.ndim != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram: expected [B, W, W], got shape {tuple(gram.shape)}")
    b, w, _ = gram.shape
    dev = gram.device
    valid = torch.as_tensor(valid, dtype=torch.int64, device=dev).expand(b)
    scale = torch.as_tensor(scale, dtype=torch.float64, device=dev).expand(b)
    c = centre(gram, valid) * scale[:, None, None]  # [B, W, W] float64
    row_sq = torch.diagonal(c, dim1=1, dim2=2).clone()  # [B, W]
    ok = torch.isfinite(c).flatten(1).all(1)  # [B]
    if backend.use_triton(dev):
        # Centring is linear: scale the raw Gram first, then one launch for all windows.
        g32 = torch.where(ok[:, None, None], gram.to(torch.float64) * scale[:, None, None], 0.0)
        eigs = backend.triton_eigvalsh().centred_eigvalsh(g32.to(torch.float32).contiguous(),
                                                          valid.contiguous(), 1)
        return eigs, row_sq.to(torch.float32), ok
    eigs = torch.zeros((b, w), dtype=torch.float64, device=dev)
    if bool(ok.all()):
        eigs = torch.linalg.eigvalsh(c).flip(-1).clamp_min(0.0)
    elif bool(ok.any()):
        eigs[ok] = torch.linalg.eigvalsh(c[ok]).flip(-1).clamp_min(0.0)
    return eigs, row_sq, ok
