"""Triton forward of the Sparton sparse head: w[b, v] = log1p(max(0, max_t (H Wᵀ + bias)[b, t, v])).

Private to eigenwatch.kernels.sparton (the public API, backend choice and autograd).

One program owns one (batch row b, vocab tile of BLOCK_V) pair. It walks the
tokens in chunks of BLOCK_S; per chunk a [BLOCK_S, BLOCK_V] logits tile is
built in fp32 registers (tl.dot over D in BLOCK_D steps) and folded into a
running max over tokens that starts at 0, so relu costs nothing and log1p is
applied once to the final max (both are monotone). The [B, S, V] logits never
exist; memory traffic is H and W only (DESIGN.md "Sparton").

Ties: within a chunk tl.max keeps the leftmost token, and a later chunk
replaces the running max only when strictly larger, so the saved argmax is the
first token (smallest t) holding the max, the same rule as numpy.argmax and
the reference. Where no unmasked logit is > 0 (including rows whose mask is all
zero) the output is exactly 0 and the argmax is -1. NaN logits never win a
comparison here, so they are ignored (the torch path propagates them).

Program order: b varies fastest, so the B programs that share a W tile run
together and W streams from HBM about once while H (small) stays in L2.

On CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 set
before triton is first imported), which is how CI tests it. GPU speed is
designed for, not measured here: see bench/bench_sparton.py (and its --sweep).

Requires triton; importing this module without it raises ImportError.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import _triton
from ._triton import tl, triton  # ImportError without triton: kernels/sparton.py then uses torch

@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch options of one forward launch."""

    block_s: int = 128  # tokens per chunk (the M of the per-chunk GEMM)
    block_v: int = 128  # vocab entries per program (N)
    block_d: int = 64  # reduction step over the hidden size (K)
    num_warps: int = 8
    num_stages: int = 4
    # One software pipeline over (token chunk, K step) pairs instead of one per
    # chunk (tl.range flatten=True, as in Triton's persistent matmul): no pipeline
    # refill per chunk, and fewer registers on sm_90 (194 vs 218 in the bf16 default).
    flatten: bool = True


@triton.jit
def _sparton_fwd_kernel(
    h_ptr,  # [B, S, D] f32/bf16/f16
    m_ptr,  # [B, S] uint8, nonzero = token counts
    w_ptr,  # [V, D] same dtype as h
    b_ptr,  # [V] bias (unused without HAS_BIAS)
    out_ptr,  # [B, V] f32: log1p of the running max
    idx_ptr,  # [B, V] int32: first token holding the max, -1 if none (unused without NEED_IDX)
    B,
    S,
    D,
    V,
    stride_hb,
    stride_hs,
    stride_hd,
    stride_mb,
    stride_ms,
    stride_wv,
    stride_wd,
    HAS_BIAS: tl.constexpr,
    NEED_IDX: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (TF32 would cost ~3 digits), "tf32" otherwise (ignored)
    UPCAST: tl.constexpr,  # interpreter + bf16 only: its tl.dot multiplies bf16 bit patterns (triton#11584)
    BLOCK_S: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid % B
    v0 = (pid // B) * BLOCK_V
    offs_v = v0 + tl.arange(0, BLOCK_V)
    v_in = offs_v < V
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    # 64-bit offsets: W alone can pass 2^31 elements (V 250k × D 8k).
    h_row = h_ptr + b.to(tl.int64) * stride_hb
    w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv  # [1, BLOCK_V]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_v, mask=v_in, other=0.0).to(tl.float32)

    run_max = tl.zeros([BLOCK_V], dtype=tl.float32)  # relu: the max starts at 0
    run_idx = tl.full([BLOCK_V], -1, dtype=tl.int32)
    for s0 in tl.range(0, S, BLOCK_S, flatten=FLATTEN):
        s = s0 + offs_s
        s_in = s < S
        keep = tl.load(m_ptr + b * stride_mb + s * stride_ms, mask=s_in, other=0) != 0  # [BLOCK_S]
        h_ptrs = h_row + s.to(tl.int64)[:, None] * stride_hs + offs_d[None, :] * stride_hd  # [BLOCK_S, BLOCK_D]
        w_ptrs = w_cols + offs_d[:, None] * stride_wd  # [BLOCK_D, BLOCK_V]
        acc = tl.zeros([BLOCK_S, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_in = (d0 + offs_d) < D
            h = tl.load(h_ptrs, mask=s_in[:, None] & d_in[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=d_in[:, None] & v_in[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
            h_ptrs += BLOCK_D * stride_hd
            w_ptrs += BLOCK_D * stride_wd
        if HAS_BIAS:
            acc += bias[None, :]
        # Masked and past-the-end tokens can never win (the running max starts at 0 > -inf).
        acc = tl.where(keep[:, None], acc, float("-inf"))
        if NEED_IDX:
            c_max, c_arg = tl.max(acc, axis=0, return_indices=True, return_indices_tie_break_left=True)
            better = c_max > run_max  # strict: an earlier chunk keeps a tie
            run_idx = tl.where(better, s0 + c_arg.to(tl.int32), run_idx)
            run_max = tl.where(better, c_max, run_max)
        else:
            run_max = tl.maximum(run_max, tl.max(acc, axis=0))

    # log1p without libdevice, accurate for small x (Goldberg 1991, Thm. 4):
    # with u = 1 + x rounded, log1p(x) = log(u) · x / (u - 1), and x itself when u == 1.
    u = 1.0 + run_max
    den = u - 1.0
    w_out = tl.where(den == 0.0, run_max, tl.log(u) * (run_max / tl.where(den == 0.0, 1.0, den)))
    out_off = b.to(tl.int64) * V + offs_v
    tl.store(out_ptr + out_off, w_out, mask=v_in)
    if NEED_IDX:
        tl.store(idx_ptr + out_off, run_idx, mask=v_in)


# --------------------------------------------------------------------------- wrappers


def interpreted() -> bool:
    """True when this module's kernel runs in Triton's interpreter."""
    return _triton.interpreted(_sparton_fwd_kernel)


def available() -> bool:
    """True when the kernel can run here: a CUDA (or ROCm) device, or the
    interpreter (TRITON_INTERPRET=1 set before triton was first imported)."""
    return _triton.available(_sparton_fwd_kernel)


def check_device(name: str, device: torch.device) -> None:
    """Raise when a tensor on `device` cannot go to this kernel (device, interpreter state)."""
    _triton.check_device(name, device, _sparton_fwd_kernel)


def default_config(S: int, D: int, dtype: torch.dtype, smem_bytes: int | None = None) -> KernelConfig:
    """Tile shape for a launch. Interpreter: the smallest tiles tl.dot accepts
    (fast to simulate). GPU: a Hopper-style GEMM tile (wgmma, cp.async
    pipeline) that lowers for sm_90 without register spills (tests/test_sparton.py
    compiles every one), not yet tuned on a GPU: bench/bench_sparton.py --sweep
    times alternatives. fp32 runs the exact "ieee" dot on CUDA cores (not a
    speed target) with smaller tiles. smem_bytes: the device's shared memory per
    block; pipeline stages are dropped until the operand buffers fit."""
    if interpreted():
        return KernelConfig(block_s=16, block_v=32, block_d=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        # flatten spills registers here (the ieee dot's operands); the nested loops do not.
        cfg = KernelConfig(block_s=64, block_v=64, block_d=32, num_warps=4, num_stages=2, flatten=False)
    elif S <= 64:  # short rows (decode-time taps): a thinner M tile wastes less
        cfg = KernelConfig(block_s=64, block_v=128, block_d=64, num_warps=4, num_stages=3)
    else:
        cfg = KernelConfig(block_s=128, block_v=128, block_d=64, num_warps=8, num_stages=4)
    if smem_bytes:
        per_stage = (cfg.block_s + cfg.block_v) * cfg.block_d * (4 if dtype == torch.float32 else 2)
        stages = max(1, min(cfg.num_stages, (smem_bytes - 4096) // per_stage))  # 4 KiB for the reductions
        cfg = dataclasses.replace(cfg, num_stages=int(stages))
    return cfg


def forward(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    need_idx: bool,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, S, D], mask [B, S] uint8, weight [V, D], bias [V] or None
    -> (w [B, V] f32, argmax [B, V] int32, or an empty [0] int32 without need_idx).

    Inputs are validated by the caller (eigenwatch.kernels.sparton); any strides work.
    """
    check_device("hidden", hidden.device)
    B, S, D = hidden.shape
    V = weight.shape[0]
    out = torch.empty((B, V), device=hidden.device, dtype=torch.float32)
    idx = torch.empty((B, V) if need_idx else (0,), device=hidden.device, dtype=torch.int32)
    if B == 0 or V == 0:
        return out, idx
    if config is None:
        smem = None
        if hidden.device.type == "cuda":
            smem = getattr(torch.cuda.get_device_properties(hidden.device), "shared_memory_per_block_optin", None)
        config = default_config(S, D, hidden.dtype, smem)
    cfg = config
    upcast = interpreted() and hidden.dtype == torch.bfloat16
    grid = (B * triton.cdiv(V, cfg.block_v),)
    _sparton_fwd_kernel[grid](
        hidden, mask, weight, bias if bias is not None else out, out, idx if need_idx else out,
        B, S, D, V,
        hidden.stride(0), hidden.stride(1), hidden.stride(2),
        mask.stride(0), mask.stride(1),
        weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None,
        NEED_IDX=need_idx,
        PRECISION="ieee" if hidden.dtype == torch.float32 or upcast else "tf32",
        UPCAST=upcast,
        BLOCK_S=cfg.block_s,
        BLOCK_V=cfg.block_v,
        BLOCK_D=cfg.block_d,
        FLATTEN=cfg.flatten,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, idx
