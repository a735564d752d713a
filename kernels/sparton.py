"""Sparton: SPLADE-style sparse heads without the [tokens × vocab] logits.

    w[b, v] = max over unmasked tokens t of log1p(relu((H Wᵀ + bias)[b, t, v]))

hidden [B, S, D], mask [B, S] (nonzero = the token counts), W [V, D], bias [V]
or None -> w [B, V]. Because relu and log1p are monotone, the max is taken over
raw logits and relu and log1p are applied once to it at the end (Sparton's
trick; DESIGN.md). Two paths compute it:

- Triton (kernels/_sparton_kernel.py): one fused kernel, logits live only in
  registers; for CUDA tensors.
- torch: per vocab tile one GEMM of the unmasked token rows, then a max over
  each batch row's tokens; at most `SpartonConfig.tile_bytes` of logits exist
  at a time (plus the GEMM library's own workspace). Runs anywhere; bf16 stays bf16 on CPUs with native bf16 dot
  products (fp32 accumulation inside oneDNN), fp16 and bf16 elsewhere go
  through fp32.

Definitions every path follows (and tests/reference.py checks):
- a (b, v) with no unmasked logit > 0, e.g. a batch row whose mask is all zero,
  gives w = 0 exactly, argmax -1 and zero gradient (relu'(0) = 0, as in torch);
- the argmax is the first token (smallest t) holding the max of the computed
  logits; the gradient of w[b, v] flows through that one logit only (a
  subgradient, like torch.max(dim));
- gradients: dw/dlogit = 1 / (1 + max) = exp(-w), scattered to hidden[b, t],
  W[v] and bias[v]; O(B·V·D) work, no [B, S, V] tensor either;
- NaN logits: the torch path propagates them into w, the Triton path ignores them.

The forward is the custom op `eigenwatch::sparton_head` (torch.library, with a
fake kernel and autograd), so it composes with torch.compile and autograd.
Backend choice (EIGENWATCH_BACKEND=auto|torch|triton) follows
kernels/backend.py: auto takes Triton for CUDA tensors when it works and falls
back quietly; an explicit choice that cannot be honoured raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .backend import sparton_kernel, use_sparton_triton

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class SpartonConfig:
    """Memory budgets of the torch path (the Triton path needs no temporaries)."""

    # Logits of one vocab tile, [vocab tile, unmasked tokens] in the compute dtype.
    # 8 MiB (1024 columns at MiniLM's fp32 shape): on the 2-core dev box, idle,
    # tiles of 256..2048 columns all ran at the speed of the tiled GEMM alone; under
    # load from other processes wider tiles win (fewer parallel regions), but 12 MiB
    # already puts the forward past 16 MiB extra in all (bench_sparton.py --tiles).
    tile_bytes: int = 8 << 20
    # Backward temporaries, [B, vocab tile, D] in fp32.
    grad_tile_bytes: int = 8 << 20
    # Vocab tiles are multiples of this (SIMD/GEMM-friendly widths).
    align: int = 64


CONFIG = SpartonConfig()


# --------------------------------------------------------------------------- backend choice


_kernel_module = sparton_kernel  # the Triton module, or None where it cannot run


def _choose_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """"torch" or "triton" for tensors on `device` (kernels/backend.py decides)."""
    return "triton" if use_sparton_triton(device, dtype) else "torch"


# --------------------------------------------------------------------------- torch path


@lru_cache(maxsize=None)
def _cpu_has_bf16() -> bool:
    # oneDNN's check for native bf16 dot products (AVX512-BF16 / AMX); without
    # them a bf16 GEMM is emulated and slower than fp32.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if device.type != "cpu" or dtype in (torch.float32, torch.float64):
        return dtype
    if dtype == torch.bfloat16 and _cpu_has_bf16():
        return dtype
    return torch.float32


def _vocab_tile(rows: int, itemsize: int, V: int, budget: int, align: int) -> int:
    """Widest multiple of `align` whose [rows, tile] logits fit in `budget` bytes (≥ align, ≤ V)."""
    t = budget // max(1, rows * itemsize) // align * align
    return max(1, min(V, max(align, t)))


def _torch_forward(
    hidden: torch.Tensor,
    keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    need_idx: bool,
    tile_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, S, D], keep [B, S] uint8, weight [V, D], bias [V] | None
    -> (w [B, V] f32 (f64 for f64 inputs), argmax [B, V] int32 or [0])."""
    B, S, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    cdt = _compute_dtype(hidden.dtype, dev)
    out_dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # Max over tokens of the raw dot products; the bias is constant over tokens,
    # so it is added after the max (exact: rounding x + b is monotone in x), and a
    # batch row with no token keeps -inf, which relu turns into 0.
    best = torch.full((B, V), float("-inf"), device=dev, dtype=out_dt)
    tok = torch.full((B, V) if need_idx else (0,), -1, device=dev, dtype=torch.int32)
    if B and V and S:
        _tiled_max(hidden, keep, weight, cdt, best, tok, need_idx, tile_bytes or CONFIG.tile_bytes)
    if bias is not None:
        best += bias.to(out_dt)
    if need_idx:
        tok.masked_fill_(~(best > 0), -1)  # no positive logit: no token, zero gradient
    best.clamp_min_(0).log1p_()
    return best, tok


def _tiled_max(hidden, keep, weight, cdt, best, tok, need_idx, tile_bytes) -> None:
    """best[b, v] = max over kept tokens t of hidden[b, t] · weight[v] in `cdt` (in place), and
    tok[b, v] = the first such t, one [kept tokens, vocab tile] GEMM at a time."""
    B, S, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    # Only kept token rows enter the GEMM (padding costs nothing). One host read
    # of the counts: this path is not for CUDA graphs (the Triton one is).
    kept = keep.reshape(B * S).bool()
    counts = kept.view(B, S).sum(1).tolist()
    rows = hidden.reshape(B * S, D)
    all_kept = sum(counts) == B * S
    if not all_kept:
        rows = rows[kept]  # [N, D], a copy of the kept rows only
    rows = rows.to(cdt)
    N = rows.shape[0]
    if N == 0:
        return
    equal = len(set(counts)) == 1  # then one [tile, B, L] view reduces every batch row at once
    L = counts[0]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    if need_idx:  # position within its batch row of each kept token
        pos = torch.arange(S, device=dev, dtype=torch.int32).repeat(B)
        pos = pos if all_kept else pos[kept]
    vt = _vocab_tile(N, rows.element_size(), V, tile_bytes, CONFIG.align)
    rows_t = rows.T  # [D, N], a view
    for v0 in range(0, V, vt):
        v1 = min(V, v0 + vt)
        logits = None  # free the last tile before the GEMM allocates the next (else two are alive)
        # Transposed tile [vt, N]: each (v, batch row) reduces over contiguous
        # memory, 4× faster than over a strided dim for max-with-indices on CPU.
        logits = torch.mm(weight[v0:v1].to(cdt), rows_t)  # W converted per tile, if at all
        if equal:
            _fold_equal(logits.view(v1 - v0, B, L), pos.view(B, L) if need_idx else None, best, tok, v0, v1)
            continue
        for b in range(B):
            if counts[b]:
                seg = slice(starts[b], starts[b + 1])
                _fold_row(logits[:, seg], pos[seg] if need_idx else None, best, tok, b, v0, v1)


def _fold_equal(lg, pos, best, tok, v0, v1) -> None:
    """lg: [vt, B, L] logits of a vocab tile, every batch row with L kept tokens; pos: [B, L]."""
    if pos is None:
        best[:, v0:v1] = lg.amax(dim=2).T
        return
    m, a = lg.max(dim=2)  # [vt, B]; the first maximal token on ties
    best[:, v0:v1] = m.T
    tok[:, v0:v1] = pos.gather(1, a.T)


def _fold_row(lg, pos, best, tok, b, v0, v1) -> None:
    """lg: [vt, kept tokens of row b] logits of a vocab tile; pos: [kept tokens]."""
    if pos is None:
        best[b, v0:v1] = lg.amax(dim=1)
        return
    m, a = lg.max(dim=1)
    best[b, v0:v1] = m
    tok[b, v0:v1] = pos[a]


# --------------------------------------------------------------------------- the custom op


@torch.library.custom_op(
    "eigenwatch::sparton_head",
    mutates_args=(),
    schema="(Tensor hidden, Tensor keep, Tensor weight, Tensor? bias, str backend, bool need_idx) -> (Tensor, Tensor)",
)
def _sparton_head(hidden, keep, weight, bias, backend, need_idx):
    if backend == "triton":
        mod = _kernel_module()
        if mod is None:
            raise RuntimeError("eigenwatch::sparton_head: backend 'triton' requested but Triton cannot run here")
        return mod.forward(hidden, keep, weight, bias, need_idx)
    if backend != "torch":
        raise ValueError(f"backend: expected 'torch' or 'triton', got {backend!r}")
    return _torch_forward(hidden, keep, weight, bias, need_idx)


@_sparton_head.register_fake
def _(hidden, keep, weight, bias, backend, need_idx):
    B, V = hidden.shape[0], weight.shape[0]
    out_dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return hidden.new_empty((B, V), dtype=out_dt), hidden.new_empty((B, V) if need_idx else (0,), dtype=torch.int32)


def _setup_context(ctx, inputs, output):
    hidden, keep, weight, bias, backend, need_idx = inputs
    w, idx = output
    ctx.has_bias = bias is not None
    ctx.need_idx = need_idx
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(hidden, weight, w, idx)


def _backward(ctx, grad_w, grad_idx):
    hidden, weight, w, idx = ctx.saved_tensors
    if not ctx.need_idx:
        raise RuntimeError(
            "sparton_head: the argmax was not kept (need_idx=False); call sparse_head with grad "
            "enabled and an input that requires grad"
        )
    need_h, _, need_w, need_b = ctx.needs_input_grad[:4]
    if grad_w is None:  # only the (integer) argmax output was used
        return None, None, None, None, None, None
    grads = _grad_from_argmax(hidden, weight, w, idx, grad_w, need_h, need_w, need_b and ctx.has_bias)
    dh, dw, db = grads
    if db is not None:
        db = db.to(ctx.bias_dtype)
    return dh, None, dw, db, None, None


def _grad_from_argmax(hidden, weight, w, idx, grad_w, need_h, need_w, need_b):
    """Gradients from the saved argmax: g = grad_w · exp(-w) on (b, v) with a token,
    dbias = Σ_b g, dW[v] = Σ_b g[b, v] H[b, t(b, v)], dH[b, t] = Σ_{v: t(b, v) = t} g[b, v] W[v]."""
    B, S, D = hidden.shape
    V = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    has = idx >= 0
    g = torch.where(has, grad_w.to(acc) * torch.exp(-w.to(acc)), 0.0)  # [B, V]; d log1p(m)/dm = 1/(1+m) = e^-w
    # Flat token row of each (b, v); (b, v) without a token point at row b·S with g = 0.
    flat = (torch.arange(B, device=idx.device, dtype=torch.int64)[:, None] * S + idx.clamp_min(0).to(torch.int64))
    rows = hidden.reshape(B * S, D)
    dh = torch.zeros((B * S, D), device=hidden.device, dtype=acc) if need_h else None
    dw = torch.empty((V, D), device=weight.device, dtype=weight.dtype) if need_w else None
    vt = _vocab_tile(B * D, 4, V, CONFIG.grad_tile_bytes, CONFIG.align)
    for v0 in range(0, V, vt):
        v1 = min(V, v0 + vt)
        gt = g[:, v0:v1]  # [B, vt]
        ft = flat[:, v0:v1].reshape(-1)  # [B·vt]
        if need_w:
            hsel = rows.index_select(0, ft).view(B, v1 - v0, D).to(acc)  # [B, vt, D]
            dw[v0:v1] = torch.einsum("bv,bvd->vd", gt, hsel).to(weight.dtype)
        if need_h:
            contrib = gt[:, :, None] * weight[v0:v1].to(acc)[None]  # [B, vt, D]
            dh.index_add_(0, ft, contrib.view(-1, D))
    if dh is not None:
        dh = dh.view(B, S, D).to(hidden.dtype)
    db = g.sum(0) if need_b else None
    return dh, dw, db


_sparton_head.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public API


def _check_inputs(hidden, mask, weight, bias) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
        raise ValueError(f"hidden: expected a [B, S, D] tensor, got {getattr(hidden, 'shape', type(hidden))}")
    B, S, D = hidden.shape
    if hidden.dtype not in _DTYPES:
        raise ValueError(f"hidden: expected one of {_DTYPES}, got {hidden.dtype}")
    if D < 1:
        raise ValueError(f"hidden: hidden size D must be ≥ 1, got {D}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, S):
        raise ValueError(f"mask: expected shape ({B}, {S}), got {tuple(getattr(mask, 'shape', ()))}")
    if mask.dtype.is_complex:
        raise ValueError(f"mask: expected bool, integer or float, got {mask.dtype}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.shape[1] != D:
        raise ValueError(f"weight: expected [V, {D}], got {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}")
    V = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (V,):
            raise ValueError(f"bias: expected shape ({V},) or None, got {tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias: dtype {bias.dtype} differs from hidden's {hidden.dtype}")
    for name, t in (("mask", mask), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: on {t.device}, expected hidden's device {hidden.device}")


def sparse_head(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """hidden [B, S, D], mask [B, S], weight [V, D], bias [V] | None -> w [B, V].

    w[b, v] = max over tokens with mask[b, t] != 0 of log1p(relu(hidden[b, t] · weight[v] + bias[v])),
    and 0 where no such logit is positive (all-masked rows give zeros).
    Accumulates in fp32 (fp64 for fp64 inputs, torch path only); the result is
    returned in `out_dtype` (default: hidden's dtype). Differentiable w.r.t.
    hidden, weight and bias (see the module docstring for ties)."""
    _check_inputs(hidden, mask, weight, bias)
    backend = _choose_backend(hidden.device, hidden.dtype)
    need_idx = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    keep = (mask != 0).view(torch.uint8)  # [B, S], 1 = the token counts
    w, _ = torch.ops.eigenwatch.sparton_head(hidden, keep, weight, bias, backend, need_idx)
    return w.to(out_dtype or hidden.dtype)


def sparse_head_topk(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    k: int,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest terms of sparse_head per row: (values [B, k] descending, ids [B, k] int64).

    Rows with fewer than k positive terms are padded with value 0 and id -1.
    Values are differentiable like sparse_head's output."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= weight.shape[0]:
        V = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.ndim == 2 else "V"
        raise ValueError(f"k: expected an int in 1..{V}, got {k!r}")
    w = sparse_head(hidden, mask, weight, bias, out_dtype=out_dtype)  # [B, V]; small next to the logits
    values, ids = torch.topk(w, k, dim=1)
    ids = ids.masked_fill(values <= 0, -1)
    return values, ids
