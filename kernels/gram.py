"""The spectrum of a window, from its raw Gram: the one place eigenvalues of a
window are computed (both taps, offline and live, CPU and GPU).

A window of V token rows x_1..x_V of width d is described by the eigenvalues of
its token-centred Gram divided by d, S = H G H / d with G = X Xᵀ and
H = I − 11ᵀ/V (centring over tokens), in a W×W buffer whose leading V×V
block is in use; the rest is ignored. The taps' Grams come centred already
(kernels/window_bank.py centres rows before the product), which `centred=True`
skips; raw Grams are centred here. Ring order does not matter: a permutation of the rows does
not change the eigenvalues.

`spectra` is batched over many windows at once, one eigensolve for all of
them. Where it runs: CPU Grams go through numpy (float64 LAPACK): a few small
matrices are cheap there, while torch's small ops share the intra-op thread
pool with the model's forward and, on a busy host, wait on it for
milliseconds each. Device Grams stay on the device: torch's float64
`eigvalsh`, or on CUDA the Triton Jacobi eigensolver
(kernels/triton_eigvalsh.py, float32, no host synchronisation), as
kernels/backend.py chooses. `centre` is written once for both array libraries.
"""

from __future__ import annotations

import numpy as np

# torch only inside the torch paths: the sidecar imports this module for
# `spectra_np` (windows sent as Grams) and must not load torch.


def centre(gram, valid):
    """gram: [B, W, W] raw inner products (numpy or torch); valid: [B] int rows in use.
    Returns H·G·H on each valid block in float64, zeros elsewhere: [B, W, W]."""
    b, w, _ = gram.shape
    if type(gram).__module__.startswith("torch"):
        import torch

        g = gram.to(torch.float64)
        valid = valid.to(device=gram.device, dtype=torch.int64)
        inside = torch.arange(w, device=gram.device)[None, :] < valid[:, None]  # [B, W]
        n = valid.to(torch.float64).clamp_min(1)[:, None]  # [B, 1]
        where = torch.where
    else:
        g = np.asarray(gram, dtype=np.float64)
        valid = np.asarray(valid, dtype=np.int64)
        inside = np.arange(w)[None, :] < valid[:, None]
        n = np.maximum(valid, 1).astype(np.float64)[:, None]
        where = np.where
    block = inside[:, :, None] & inside[:, None, :]  # [B, W, W]
    # where, not a product with a 0/1 mask: entries outside the block may hold
    # anything (a reused slot's stale NaN row), and NaN·0 is NaN.
    g = where(block, g, 0.0)
    row_mean = g.sum(-1) / n  # [B, W]
    total = row_mean.sum(-1)[:, None] / n  # [B, 1]
    c = g - row_mean[:, :, None] - row_mean[:, None, :] + total[:, :, None]
    return where(block, c, 0.0)


def spectra_np(gram: np.ndarray, valid, scale, *, centred: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`spectra` for host arrays: gram [B, W, W], valid [B] or int, scale [B] or
    float -> (eigs [B, W], row_sq [B, W], ok [B]) float64 numpy. centred=True:
    the Grams are centred already (kernels/window_bank.py), only masked here."""
    gram = np.asarray(gram)
    b, w, _ = gram.shape
    valid = np.broadcast_to(np.asarray(valid, dtype=np.int64), (b,))
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (b,))
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf windows are flagged in ok
        if centred:
            inside = np.arange(w)[None, :] < valid[:, None]
            c = np.where(inside[:, :, None] & inside[:, None, :], gram.astype(np.float64), 0.0)
        else:
            c = centre(gram, valid)
        c = c * scale[:, None, None]
    row_sq = np.diagonal(c, axis1=1, axis2=2).copy()
    ok = np.isfinite(c).reshape(b, -1).all(axis=1)
    eigs = np.zeros((b, w))
    if ok.any():
        eigs[ok] = np.clip(np.linalg.eigvalsh(c[ok])[:, ::-1], 0.0, None)
    return eigs, row_sq, ok


def spectra(gram: "torch.Tensor", valid, scale) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
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
    import torch

    from . import backend

    if gram.ndim != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram: expected [B, W, W], got shape {tuple(gram.shape)}")
    b, w, _ = gram.shape
    dev = gram.device
    if dev.type == "cpu" and not backend.use_triton(dev):
        host = lambda x, dt: x.detach().numpy().astype(dt) if isinstance(x, torch.Tensor) else np.asarray(x, dt)
        eigs, row_sq, ok = spectra_np(gram.detach().numpy(), host(valid, np.int64), host(scale, np.float64))
        return torch.from_numpy(eigs), torch.from_numpy(row_sq), torch.from_numpy(ok)
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
