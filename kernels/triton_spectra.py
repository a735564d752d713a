"""Triton kernels for the per-step spectral work of many requests at once.

State per slot (one slot = one request × layer), laid out by the caller:

    ring  [S, W, k] float32   the last W rows; row t of a slot lives at t % W
    gram  [S, W, W] float32   raw inner products of the ring rows
    count [S]       int64     rows seen; positions < min(count, W) are valid

`gram_update` writes one new row per slot and refreshes its Gram row/column
(O(W·k) per row, the incremental update of DESIGN.md, not O(W²·k)).
`centred_eigvalsh` turns the Grams into descending eigenvalues of the
token-centred Gram / dim, one Jacobi eigensolver per matrix, all in one launch.
Both are sync-free (no host reads of device values), so they can sit inside a
captured CUDA graph.

The reference they must match is `kernels/spectra.py::window_eigenvalues`
(eigenvalues of Xc Xcᵀ / d, clamped at 0). On CPU the kernels run under
Triton's interpreter (TRITON_INTERPRET=1 set before triton is first imported),
which is how CI tests them. GPU speed is designed for, not yet measured:
see bench/gpu_spectra.py.

Requires triton; importing this module without it raises ImportError.
"""

from __future__ import annotations

import numbers

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the sidecar/CPU install has no triton
    raise ImportError(
        "eigenwatch.kernels.triton_spectra needs triton (pip install triton); "
        "use the torch path in eigenwatch.kernels on machines without it"
    ) from e

MAX_W = 64  # the eigensolver keeps a whole W×W block in registers
# Warps per matrix, from ptxas on sm_90 (no GPU timing yet): the fewest total
# instructions per Jacobi round with no register spills.
_EIG_WARPS = {16: 2, 32: 4, 64: 8}
_MIN_BLOCK = 16  # tl.dot needs every dimension ≥ 16
_ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int32, torch.int64)
METHODS = ("gather", "dot")


# --------------------------------------------------------------------------- kernels


@triton.jit
def _gram_update_kernel(
    ring_ptr,  # [S, W, K] f32
    gram_ptr,  # [S, W, W] f32
    rows_ptr,  # [B, K] f32/bf16/f16
    slots_ptr,  # [B] int
    pos_ptr,  # [B] int
    S,
    W,
    K,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.load(slots_ptr + b).to(tl.int64)
    p = tl.load(pos_ptr + b).to(tl.int64)
    # Out-of-range entries write nothing: slot -1 marks padding in a fixed-size
    # (CUDA-graph) batch, and a bad index can never write out of bounds.
    ok = (s >= 0) & (s < S) & (p >= 0) & (p < W)
    s = tl.where(ok, s, 0)
    p = tl.where(ok, p, 0)
    # Fold `ok` into the bounds, not into the masks: the interpreter (triton
    # 3.9) turns `bool_tensor & bool_scalar` into int32 and rejects it as a mask.
    w_end = tl.where(ok, W, 0)
    k_end = tl.where(ok, K, 0)

    w = tl.arange(0, BLOCK_W)
    w_in = w < w_end
    ring_s = ring_ptr + s * W * K
    acc = tl.zeros([BLOCK_W, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_in = kk < k_end
        r = tl.load(rows_ptr + b * K + kk, mask=k_in, other=0.0).to(tl.float32)  # [BLOCK_K]
        # Read the other W-1 ring rows once; row p is the new row itself, taken
        # from registers (no read-after-write on the store below).
        old = tl.load(
            ring_s + w[:, None] * K + kk[None, :],
            mask=(w_in & (w != p))[:, None] & k_in[None, :],
            other=0.0,
        )  # [BLOCK_W, BLOCK_K]
        x = tl.where((w == p)[:, None], r[None, :], old)
        acc += x * r[None, :]
        tl.store(ring_s + p * K + kk, r, mask=k_in)
    d = tl.sum(acc, axis=1)  # [BLOCK_W] = <ring[s, w], row>
    gram_s = gram_ptr + s * W * W
    tl.store(gram_s + p * W + w, d, mask=w_in)  # row p
    tl.store(gram_s + w * W + p, d, mask=w_in)  # column p (same value at [p, p])


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


# --------------------------------------------------------------------------- wrappers


def _interpreted() -> bool:
    """True when this module's kernels run in Triton's interpreter."""
    return type(_gram_update_kernel).__name__ == "InterpretedFunction"


def _mixed() -> bool:
    # triton.jit picks the interpreter when a function is decorated, reading
    # TRITON_INTERPRET then: triton's own library (tl.sort) at `import triton`,
    # our kernels at the import of this module. Set in between, they disagree
    # and every launch fails.
    return _interpreted() != (type(tl.sort).__name__ == "InterpretedFunction")


def available() -> bool:
    """True when these kernels can run here: a CUDA (or ROCm) device, or the
    Triton interpreter (TRITON_INTERPRET=1 set before triton was first imported)."""
    if _mixed():
        return False
    return _interpreted() or torch.cuda.is_available()


def _update_config(w: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_W, BLOCK_K, num_warps) of gram_update: ~4K f32 accumulators per
    program, a [W, BLOCK_K] tile streamed over k."""
    block_w = triton.next_power_of_2(w)
    return block_w, max(16, min(triton.next_power_of_2(k), 4096 // block_w)), 4


def _eig_config(w: int) -> tuple[int, int]:
    """(N, num_warps) of centred_eigvalsh: the power-of-two block and warps per matrix."""
    n = max(_MIN_BLOCK, triton.next_power_of_2(w))
    return n, _EIG_WARPS[n]


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def _check_backend(name: str, t: torch.Tensor) -> None:
    if _mixed():
        raise RuntimeError(
            "TRITON_INTERPRET changed between `import triton` and the import of "
            "eigenwatch.kernels.triton_spectra; set it (or unset it) before triton is first "
            "imported, e.g. in the environment of a fresh process"
        )
    if t.device.type != "cuda" and not _interpreted():
        raise ValueError(
            f"{name}: tensor is on {t.device}; the Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 set before triton is first imported, for CPU testing)"
        )


def _check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous())")


def gram_update(
    ring: torch.Tensor, gram: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor
) -> None:
    """In place, for each b: ring[slots[b], pos[b]] = rows[b] and row/column
    pos[b] of gram[slots[b]] = ring[slots[b]] @ rows[b].

    ring: [S, W, k] f32, gram: [S, W, W] f32, rows: [B, k] f32/bf16/f16
    (accumulated in f32), slots/pos: [B] int32/int64. Slots must be distinct
    within one call (each program owns its slot; duplicates race). Entries
    with slot or pos out of range (e.g. slot = -1 for padding) write nothing.
    """
    if ring.ndim != 3:
        raise ValueError(f"ring: expected [S, W, k], got shape {tuple(ring.shape)}")
    S, W, K = ring.shape
    if ring.dtype != torch.float32:
        raise ValueError(f"ring: expected float32, got {ring.dtype}")
    if not 1 <= W <= MAX_W:
        raise ValueError(f"ring: window W={W} outside 1..{MAX_W}")
    if K < 1:
        raise ValueError("ring: rows have width k=0")
    if gram.shape != (S, W, W) or gram.dtype != torch.float32:
        raise ValueError(f"gram: expected float32 {(S, W, W)}, got {gram.dtype} {tuple(gram.shape)}")
    if rows.ndim != 2 or rows.shape[1] != K:
        raise ValueError(f"rows: expected [B, {K}], got shape {tuple(rows.shape)}")
    if rows.dtype not in _ROW_DTYPES:
        raise ValueError(f"rows: expected one of {_ROW_DTYPES}, got {rows.dtype}")
    B = rows.shape[0]
    for name, t in (("slots", slots), ("pos", pos)):
        if t.shape != (B,):
            raise ValueError(f"{name}: expected shape ({B},), got {tuple(t.shape)}")
        if t.dtype not in _INT_DTYPES:
            raise ValueError(f"{name}: expected int32 or int64, got {t.dtype}")
    for name, t in (("ring", ring), ("gram", gram), ("rows", rows), ("slots", slots), ("pos", pos)):
        _check_device(name, t, ring.device)
        _check_contiguous(name, t)
    _check_backend("ring", ring)
    if B == 0:
        return
    block_w, block_k, warps = _update_config(W, K)
    _gram_update_kernel[(B,)](ring, gram, rows, slots, pos, S, W, K, BLOCK_W=block_w, BLOCK_K=block_k,
                              num_warps=warps)


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
    if valid.shape != (B,) or valid.dtype not in _INT_DTYPES:
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
        _check_device(name, t, gram.device)
        _check_contiguous(name, t)
    _check_backend("gram", gram)
    if out is None:
        out = torch.empty((B, W), dtype=torch.float32, device=gram.device)
    elif out.shape != (B, W) or out.dtype != torch.float32 or out.device != gram.device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous float32 {(B, W)} tensor on {gram.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if B == 0:
        return out
    n, warps = _eig_config(W)
    _centred_eigvalsh_kernel[(B,)](
        gram, valid, out, W, 1.0 / int(dim), float(tol) ** 2, int(max_sweeps), N=n, METHOD=method, num_warps=warps
    )
    return out
