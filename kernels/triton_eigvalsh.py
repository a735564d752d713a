"""Triton op: eigenvalues of many token-centred window Grams in one launch
(one cyclic-Jacobi eigensolver per matrix, W ≤ 64), used by kernels/gram.py on
CUDA.

Row b: the eigenvalues, descending and clamped at 0, of H G H / dim on the
leading valid[b]×valid[b] block of gram[b]. Sync-free (no host reads of
device values), so it can sit inside a captured CUDA graph. Reference:
tests/reference.py (float64 eigvalsh of the centred rows).
"""

from __future__ import annotations

import numbers

import torch

from . import _triton
from ._triton import tl, triton

MAX_W = 64  # the eigensolver keeps a whole W×W block in registers
# Warps per matrix, from ptxas on sm_90 (no GPU timing yet): the fewest total
# instructions per Jacobi round with no register spills.
_EIG_WARPS = {16: 2, 32: 4, 64: 8}
_MIN_BLOCK = 16  # tl.dot needs every dimension ≥ 16
METHODS = ("gather", "dot")


@triton.jit
def _centred_eigvalsh_kernel(
    gram_ptr,  # [B, W, W] f32, raw inner products
    valid_ptr,  # [B] int
    out_ptr,  # [B, W] f32
    W,
    inv_dim,
    tol2,
    max_sweeps,
    N: tl.constexpr,  # power-of-two block ≥ max(W, 16)
    METHOD: tl.constexpr,  # "gather" or "dot": how a round of rotations is applied
):
    b = tl.program_id(0).to(tl.int64)
    v = tl.load(valid_ptr + b).to(tl.int32)
    v = tl.minimum(tl.maximum(v, 0), W)
    i = tl.arange(0, N)
    inside = (i[:, None] < v) & (i[None, :] < v)  # the valid block
    g = tl.load(gram_ptr + b * W * W + i[:, None] * W + i[None, :], mask=inside, other=0.0)

    # A = H G H / dim on the valid block, H = I - 11ᵀ/v; zero elsewhere, so the
    # padded rows/columns contribute exact zeros and never rotate (their pivot
    # a_pq is 0, giving c = 1, s = 0 exactly).
    vf = tl.maximum(v, 1).to(tl.float32)
    row_mean = tl.div_rn(tl.sum(g, axis=1), vf)  # IEEE division, as in the interpreter
    col_mean = tl.div_rn(tl.sum(g, axis=0), vf)
    all_mean = tl.div_rn(tl.sum(row_mean, axis=0), vf)
    a = g - row_mean[:, None] - col_mean[None, :] + all_mean
    a = tl.where(inside, a, 0.0) * inv_dim
    a = 0.5 * (a + tl.trans(a))

    is_diag = i[:, None] == i[None, :]
    # ‖A‖_F is invariant under the rotations: stop when off(A)² ≤ tol²·‖A‖_F²
    # (Weyl: every eigenvalue is then within tol·‖A‖_F of a diagonal entry).
    thresh = tol2 * tl.sum(tl.sum(a * a, axis=1), axis=0)
    off = tl.sum(tl.sum(tl.where(is_diag, 0.0, a * a), axis=1), axis=0)
    dg = tl.sum(tl.where(is_diag, a, 0.0), axis=1)  # the diagonal, carried from here on
    sweep = 0
    while (sweep < max_sweeps) & (off > thresh):
        # Parallel cyclic Jacobi, hypercube ordering: round m pairs i with i ^ m,
        # so rounds m = 1..N-1 visit every pair once, N/2 disjoint rotations each.
        for m in range(1, N):
            part = i ^ m
            is_pair = i[None, :] == part[:, None]  # (i, partner(i))
            a_ip = tl.sum(tl.where(is_pair, a, 0.0), axis=1)  # a[i, p(i)]
            a_pi = tl.gather(a_ip, part, 0)  # a[p(i), i]
            dg_p = tl.gather(dg, part, 0)  # a[p(i), p(i)]
            # Both ends of a pair must get bit-identical (c, s): every quantity
            # below is symmetric in (i, p(i)) up to the sign carried by `lower`.
            lower = i < part
            apq = 0.5 * (a_ip + a_pi)
            dd = tl.where(lower, dg_p - dg, dg - dg_p)  # a_qq - a_pp
            # Golub & Van Loan Alg. 8.4.1 (sym.schur2), t = tan θ, |t| ≤ 1,
            # written without 1/a_pq and scaled against overflow. Fast sqrt and
            # division for t (they only nudge the angle); c correctly rounded,
            # since c² + s² = c²(1 + t²) must be 1: converged pairs (t ≈ 0) then
            # get c = 1 exactly, where an approximate rsqrt(1) a hair below 1
            # would shrink the matrix a little on every remaining round.
            mx = tl.maximum(tl.abs(dd), 2.0 * tl.abs(apq))
            nz = mx > 0.0
            sc = tl.where(nz, mx, 1.0)
            hyp = mx * tl.sqrt((dd / sc) * (dd / sc) + (2.0 * apq / sc) * (2.0 * apq / sc))
            sgn = tl.where(dd >= 0.0, 1.0, -1.0)
            t = tl.where(nz, 2.0 * apq * sgn / tl.where(nz, tl.abs(dd) + hyp, 1.0), 0.0)
            c = tl.div_rn(1.0, tl.sqrt_rn(1.0 + t * t))
            sig = tl.where(lower, -1.0, 1.0)
            ss = sig * t * c  # J[p(j), j] for column j: -s at p, +s at q
            if METHOD == "dot":
                # J as a dense N×N orthogonal matrix; A ← Jᵀ (A J) on FMA units
                # ("ieee": TF32 would cost ~3 decimal digits).
                jm = tl.where(is_diag, c[None, :], tl.where(is_pair, ss[None, :], 0.0))
                aj = tl.dot(a, jm, input_precision="ieee")
                rot = tl.dot(tl.trans(jm), aj, input_precision="ieee")
            else:
                # The same rotation in O(N²): each row, then each column, mixes
                # with its partner.
                prow = tl.broadcast_to(part[:, None], [N, N])
                rot = c[:, None] * a + ss[:, None] * tl.gather(a, prow, 0)
                pcol = tl.broadcast_to((i ^ m)[None, :], [N, N])
                rot = c[None, :] * rot + ss[None, :] * tl.gather(rot, pcol, 1)
            # Rutishauser's update of the pivots: a_pq := 0 exactly and
            # a_pp -= t·a_pq, a_qq += t·a_pq (≈10× smaller rounding error than
            # reading them off the rotated matrix).
            dg = dg + sig * t * apq
            a = tl.where(is_diag, dg[:, None], tl.where(is_pair, 0.0, rot))
        a = 0.5 * (a + tl.trans(a))  # keeps the diagonal bit-exact
        off = tl.sum(tl.sum(tl.where(is_diag, 0.0, a * a), axis=1), axis=0)
        sweep += 1

    ev = dg
    # Clamp at 0 like the reference (the centred Gram is PSD; negatives are
    # rounding). Padded/invalid positions hold exact zeros, so after the clamp a
    # descending sort leaves them at the end. NaN stays NaN.
    ev = tl.maximum(ev, 0.0, propagate_nan=tl.PropagateNan.ALL)
    ev = tl.sort(ev, descending=True)
    tl.store(out_ptr + b * W + i, ev, mask=i < W)


def available() -> bool:
    return _triton.available(_centred_eigvalsh_kernel)


def _config(w: int) -> tuple[int, int]:
    """(N, num_warps): the power-of-two block and warps per matrix."""
    n = max(_MIN_BLOCK, triton.next_power_of_2(w))
    return n, _EIG_WARPS[n]


def centred_eigvalsh(
    gram: torch.Tensor,
    valid: torch.Tensor,
    dim: int,
    *,
    method: str = "gather",
    tol: float = 1e-6,
    max_sweeps: int = 12,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """gram: [B, W, W] f32 raw inner products, valid: [B] int -> [B, W] f32.

    Row b: eigenvalues, descending and clamped at 0, of H G H / dim on the
    leading valid[b]×valid[b] block of gram[b] (H = I - 11ᵀ/valid[b]); entries
    from position valid[b] on are 0. valid is clamped to 0..W on the device
    (no host sync); valid ≤ 1 gives all zeros, as a one-row window has no spread.
    The gram entries outside the valid block are never read.

    out: optional [B, W] f32 destination (e.g. a persistent buffer inside a
    CUDA graph); returned.

    Cyclic Jacobi, stopping when the off-diagonal Frobenius norm is ≤ tol·‖A‖_F
    or after max_sweeps sweeps. method picks how a round of W/2 rotations is
    applied: "gather" (default) mixes each row/column with its partner, O(W²);
    "dot" builds the rotation as a dense W×W matrix for two fp32 tl.dot calls,
    O(W³), and spills registers at W > 32 on sm_90 (kept for comparison).
    """
    if gram.ndim != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram: expected [B, W, W], got shape {tuple(gram.shape)}")
    if gram.dtype != torch.float32:
        raise ValueError(f"gram: expected float32, got {gram.dtype}")
    B, W, _ = gram.shape
    if not 1 <= W <= MAX_W:
        raise ValueError(f"gram: window W={W} outside 1..{MAX_W}")
    if valid.shape != (B,) or valid.dtype not in _triton.INT_DTYPES:
        raise ValueError(f"valid: expected int32/int64 of shape ({B},), got {valid.dtype} {tuple(valid.shape)}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"dim: expected an int ≥ 1 (the row width), got {dim!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0.0 <= tol < 1.0:
        raise ValueError(f"tol: expected 0 ≤ tol < 1, got {tol!r}")
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, numbers.Integral) or not 1 <= max_sweeps <= 100:
        raise ValueError(f"max_sweeps: expected an int in 1..100, got {max_sweeps!r}")
    for name, t in (("gram", gram), ("valid", valid)):
        _triton.check_same_device(name, t, gram.device)
        _triton.check_contiguous(name, t)
    _triton.check_backend("gram", gram, _centred_eigvalsh_kernel)
    if out is None:
        out = torch.empty((B, W), dtype=torch.float32, device=gram.device)
    elif out.shape != (B, W) or out.dtype != torch.float32 or out.device != gram.device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous float32 {(B, W)} tensor on {gram.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if B == 0:
        return out
    n, warps = _config(W)
    _centred_eigvalsh_kernel[(B,)](
        gram, valid, out, W, 1.0 / int(dim), float(tol) ** 2, int(max_sweeps), N=n, METHOD=method, num_warps=warps
    )
    return out
