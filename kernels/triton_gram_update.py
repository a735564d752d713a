"""Triton op: the incremental window-Gram update (one new row per slot, one
launch for a whole decode step), used by kernels/window_bank.py on CUDA.

For each b: ring[slots[b], pos[b]] = rows[b], and row/column pos[b] of
gram[slots[b]] = ring[slots[b]] @ rows[b]: O(W·k) per row, the incremental
update of DESIGN.md, not O(W²·k). Sync-free (no host reads of device values),
so it can sit inside a captured CUDA graph. Reference: tests/reference.py.
"""

from __future__ import annotations

import torch

from . import _triton
from ._triton import tl, triton

MAX_W = 64
_ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def available() -> bool:
    return _triton.available(_gram_update_kernel)


def _config(w: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_W, BLOCK_K, num_warps): ~4K f32 accumulators per program, a
    [W, BLOCK_K] tile streamed over k."""
    block_w = triton.next_power_of_2(w)
    return block_w, max(16, min(triton.next_power_of_2(k), 4096 // block_w)), 4


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
        if t.dtype not in _triton.INT_DTYPES:
            raise ValueError(f"{name}: expected int32 or int64, got {t.dtype}")
    for name, t in (("ring", ring), ("gram", gram), ("rows", rows), ("slots", slots), ("pos", pos)):
        _triton.check_same_device(name, t, ring.device)
        _triton.check_contiguous(name, t)
    _triton.check_backend("ring", ring, _gram_update_kernel)
    if B == 0:
        return
    block_w, block_k, warps = _config(W, K)
    _gram_update_kernel[(B,)](ring, gram, rows, slots, pos, S, W, K, BLOCK_W=block_w, BLOCK_K=block_k,
                              num_warps=warps)
