"""Sparton sparse head (kernels/sparton.py, kernels/_sparton_kernel.py) against
the float64 reference in tests/reference.py.

The torch path runs in this process. The Triton kernel runs in a child process
(this file as a script) started with TRITON_INTERPRET=1, because triton picks
its interpreter when a function is decorated and other test modules may already
have imported triton; with a GPU the same checks also run compiled on CUDA.

    TRITON_INTERPRET=1 python tests/test_sparton.py [check ...]
    python tests/test_sparton.py --compile 90    # lower the GPU configs for sm_90, no GPU needed

Tolerances are normwise: max |got - ref| ≤ tol · max |ref| over the tensor
(elementwise relative error is meaningless for weights near 0), with the
reference computed on the same (rounded) inputs: fp32 1e-5, bf16/fp16 1e-2,
fp64 1e-12.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest
import torch

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
import reference  # noqa: E402

DEVICE = os.environ.get("EW_TRITON_DEVICE", "cpu")  # "cuda" for the compiled child run
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
MASKS = ("full", "ragged", "equal", "random")


# --------------------------------------------------------------------------- helpers


def assert_close(name: str, got, want, tol: float, show: int = 6) -> None:
    """Normwise check; the message lists the first mismatches."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    atol = tol * max(float(np.abs(want).max(initial=0.0)), 1e-30)
    bad = ~(np.abs(got - want) <= atol)  # NaN counts as bad
    if bad.any():
        idx = np.argwhere(bad)[:show]
        lines = [f"  {tuple(int(j) for j in i)}: got {got[tuple(i)]:.9g} want {want[tuple(i)]:.9g}" for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.size} beyond {atol:.3g} (tol {tol:g} · max|ref|), "
                             "first:\n" + "\n".join(lines))


def np64(t) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def make_mask(rng, B: int, S: int, kind: str) -> torch.Tensor:
    """[B, S] int64 (like an attention mask). ragged: prefixes of random length, one
    row empty when B > 1; equal: the same count per row at scattered positions;
    random: Bernoulli(0.6) with the last row all zero when B > 1."""
    if kind == "full":
        m = np.ones((B, S), dtype=np.int64)
    elif kind == "ragged":
        lens = rng.integers(1, S + 1, size=B)
        if B > 1:
            lens[1] = 0
        m = (np.arange(S)[None, :] < lens[:, None]).astype(np.int64)
    elif kind == "equal":
        k = max(1, S // 2)
        m = np.zeros((B, S), dtype=np.int64)
        for b in range(B):
            m[b, rng.choice(S, size=k, replace=False)] = 1
    else:
        m = (rng.random((B, S)) < 0.6).astype(np.int64)
        if B > 1:
            m[-1] = 0
    return torch.as_tensor(m, device=DEVICE)


def make_data(rng, B, S, D, V, dtype, bias: bool, ints: bool = False):
    """(hidden, weight, bias). Floats: logits ~ N(0, 1) plus a bias ~ N(0, 0.25),
    about half positive. ints: small integers, every dot product exact in every
    dtype (|logit| ≤ 4·D + 2 ≤ 256), so equal logits (ties) are common and exact."""
    if ints:
        h = rng.integers(-2, 3, size=(B, S, D)).astype(np.float64)
        w = rng.integers(-1, 2, size=(V, D)).astype(np.float64)
        b = rng.integers(-2, 3, size=V).astype(np.float64)
    else:
        h = rng.standard_normal((B, S, D))
        w = rng.standard_normal((V, D)) / np.sqrt(D)
        b = 0.5 * rng.standard_normal(V)

    def t(a):
        return torch.as_tensor(a, device=DEVICE).to(dtype)

    return t(h), t(w), (t(b) if bias else None)


def want(hidden, mask, weight, bias):
    return reference.sparse_head(np64(hidden), np64(mask), np64(weight), np64(bias))


def n_ties(hidden, mask, weight, bias) -> int:
    """How many (b, v) with a positive max reach it at two or more unmasked tokens."""
    lg = np.einsum("bsd,vd->bsv", np64(hidden), np64(weight))
    if bias is not None:
        lg = lg + np64(bias)
    lg = np.where(np64(mask)[:, :, None] != 0, lg, -np.inf)
    top = lg.max(axis=1, keepdims=True)
    return int((((lg == top).sum(axis=1) >= 2) & (top[:, 0] > 0)).sum())


def sp():
    from eigenwatch.kernels import sparton

    return sparton


def op(hidden, mask, weight, bias, backend, need_idx):
    sp()  # registers eigenwatch::sparton_head
    return torch.ops.eigenwatch.sparton_head(hidden, (mask != 0).view(torch.uint8), weight, bias, backend, need_idx)


def grads_vs_reference(name, fn, hidden, mask, weight, bias, rng, tol):
    """Backward of fn (a sparse head) against the reference's autograd, with a random grad_output."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    ref_leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    out = fn(leaves[0], mask, leaves[1], leaves[2])
    g = torch.as_tensor(rng.standard_normal(tuple(out.shape)), device=out.device)
    out.backward(g.to(out.dtype))
    ref = reference.sparse_head_autograd(ref_leaves[0], mask, ref_leaves[1], ref_leaves[2])
    ref.backward(g.to(ref.device, torch.float64))
    for label, a, r in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        if a is None:
            continue
        assert a.grad is not None, f"{name}: no gradient for {label}"
        assert a.grad.dtype == a.dtype, f"{name}: grad of {label} is {a.grad.dtype}, input {a.dtype}"
        assert_close(f"{name} d{label}", np64(a.grad), np64(r.grad), tol)


# --------------------------------------------------------------------------- Triton checks (run in the child)

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def _kernel():
    from eigenwatch.kernels import _sparton_kernel

    return _sparton_kernel


# B, S, D, V: S = 1, B = 1, D prime, V not a multiple of the 32-wide interpreter
# tile, S across several 16-token chunks.
KERNEL_SHAPES = ((1, 1, 5, 7), (2, 3, 13, 45), (3, 37, 17, 70), (1, 20, 31, 33))


@check
def check_available():
    k = _kernel()
    assert k.available(), "available() is False where the kernel runs"
    want_interp = os.environ.get("TRITON_INTERPRET") == "1"
    assert k.interpreted() == want_interp, f"interpreted={k.interpreted()} but TRITON_INTERPRET={want_interp}"


@check
def check_forward_matches_reference():
    k = _kernel()
    rng = np.random.default_rng(1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for B, S, D, V in KERNEL_SHAPES:
            for i, kind in enumerate(MASKS):  # bias on and off across the mask kinds (interpreter time)
                bias = i % 2 == 0
                h, w, b = make_data(rng, B, S, D, V, dtype, bias)
                m = make_mask(rng, B, S, kind)
                ref_w, _ = want(h, m, w, b)
                tag = f"{dtype} {(B, S, D, V)} mask={kind} bias={bias}"
                got, idx = k.forward(h, (m != 0).view(torch.uint8), w, b, kind == "random")
                assert got.dtype == torch.float32 and got.shape == (B, V), tag
                assert idx.shape == ((B, V) if kind == "random" else (0,)), tag
                assert_close(tag, np64(got), ref_w, TOL[dtype])


@check
def check_argmax_ties_across_chunks():
    """Integer data: logits are exact, ties are common; the argmax must be the first
    token holding the max, also when the tie spans two 16-token chunks."""
    k = _kernel()
    rng = np.random.default_rng(2)
    seen = 0
    for dtype in (torch.float32, torch.float16):
        for B, S, D, V in KERNEL_SHAPES:
            for kind in MASKS:
                h, w, b = make_data(rng, B, S, D, V, dtype, bias=True, ints=True)
                if S > 16:  # copy a token into the next chunk: an exact tie across chunks
                    h[:, 17 % S] = h[:, 2]
                m = make_mask(rng, B, S, kind)
                ref_w, ref_idx = want(h, m, w, b)
                got, idx = k.forward(h, (m != 0).view(torch.uint8), w, b, True)
                tag = f"{dtype} {(B, S, D, V)} mask={kind}"
                assert_close(tag, np64(got), ref_w, 1e-6)
                bad = idx.cpu().numpy() != ref_idx
                assert not bad.any(), f"{tag}: argmax differs at {np.argwhere(bad)[:5].tolist()}"
                seen += n_ties(h, m, w, b)
    assert seen > 50, f"the data made only {seen} ties; the tie rule was not exercised"


@check
def check_public_api_uses_triton_and_gradients():
    os.environ["EIGENWATCH_BACKEND"] = "triton"
    s = sp()
    assert s._choose_backend(torch.device(DEVICE), torch.float32) == "triton"
    rng = np.random.default_rng(3)
    for (B, S, D, V), kind in zip(KERNEL_SHAPES, MASKS):
        h, w, b = make_data(rng, B, S, D, V, torch.float32, bias=kind != "equal")
        m = make_mask(rng, B, S, kind)
        grads_vs_reference(f"{(B, S, D, V)} mask={kind}", s.sparse_head, h, m, w, b, rng, TOL[torch.float32])
    h, w, b = make_data(rng, 2, 20, 13, 40, torch.float32, bias=True, ints=True)
    h[:, 18] = h[:, 1]
    m = make_mask(rng, 2, 20, "full")
    grads_vs_reference("ties", s.sparse_head, h, m, w, b, rng, 1e-6)
    vals, ids = s.sparse_head_topk(h, m, w, b, k=5)
    full = s.sparse_head(h, m, w, b)
    assert torch.equal(vals, full.gather(1, ids.clamp_min(0))), (vals, ids)


@check
def check_matches_torch_path_exactly_on_integers():
    """Both paths see the same exact logits: same weights, same argmax."""
    rng = np.random.default_rng(4)
    for B, S, D, V in KERNEL_SHAPES:
        h, w, b = make_data(rng, B, S, D, V, torch.float32, bias=True, ints=True)
        m = make_mask(rng, B, S, "random")
        wt, it = op(h, m, w, b, "triton", True)
        wc, ic = op(h.cpu(), m.cpu(), w.cpu(), b.cpu(), "torch", True)
        assert torch.equal(it.cpu(), ic), f"{(B, S, D, V)}: argmax differs"
        assert_close(f"{(B, S, D, V)}", np64(wt), np64(wc), 1e-6)


@check
def check_bench_gpu_code_paths():
    """bench/bench_sparton.py's GPU case and config sweep at a tiny shape (wall-clock
    timer and no memory probe off CUDA): the code a GPU host will run, run here."""
    spec = importlib.util.spec_from_file_location("_bench_sparton", ROOT / "bench" / "bench_sparton.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    kw = {} if DEVICE == "cuda" else {"timer": bench.wall_ms, "extra": lambda fn: 0.0}
    lines = bench.gpu_case(sp(), 2, 20, 16, 70, 16, True, device=DEVICE, tiles=bench.SWEEP_TILES[:1], **kw)
    ours = [ln for ln in lines if "ours triton" in ln or "sweep" in ln]
    assert len(ours) == 2 + 2, "\n".join(lines)
    for ln in ours:
        assert float(ln.rsplit("err ", 1)[1]) <= TOL[torch.bfloat16], ln


def compile_for(arch: int) -> int:
    """Lower every configuration default_config can pick for CUDA sm_<arch> with
    triton's bundled ptxas (no GPU needed); print registers and spill stack.
    Exit 1 on a compile error or a register spill."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = _kernel()
    target = GPUTarget("cuda", arch, 32)
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    names = k._sparton_fwd_kernel.arg_names
    # What the launcher sees for contiguous, 16-byte-aligned tensors with D % 16 == 0.
    div16 = ("h_ptr", "m_ptr", "w_ptr", "b_ptr", "out_ptr", "idx_ptr", "D", "stride_hb", "stride_hs", "stride_wv")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    bad = 0
    jobs = {}  # distinct (dtype, config) pairs default_config picks; fp16 lowers like bf16 but is checked once
    for tname, dtype, seqs in (("bf16", torch.bfloat16, (256, 32)), ("fp16", torch.float16, (256,)),
                               ("fp32", torch.float32, (256, 32))):
        for S in seqs:
            jobs.setdefault((tname, k.default_config(S, 768, dtype)), (dtype, S))
    for (tname, cfg), (dtype, S) in jobs.items():
        for need in (False, True):
            sig = {n: "i32" for n in names}
            sig.update({"h_ptr": f"*{tname}", "m_ptr": "*u8", "w_ptr": f"*{tname}", "b_ptr": f"*{tname}",
                        "out_ptr": "*fp32", "idx_ptr": "*i32"})
            consts = {"stride_hd": 1, "stride_ms": 1, "stride_wd": 1, "HAS_BIAS": True, "NEED_IDX": need,
                      "PRECISION": "ieee" if dtype == torch.float32 else "tf32", "UPCAST": False,
                      "BLOCK_S": cfg.block_s, "BLOCK_V": cfg.block_v, "BLOCK_D": cfg.block_d,
                      "FLATTEN": cfg.flatten}
            for c in consts:
                sig[c] = "constexpr"
            tag = f"{tname} S{S} need_idx={need} {cfg}"
            try:
                kern = triton.compile(ASTSource(fn=k._sparton_fwd_kernel, signature=sig, constexprs=consts,
                                                attrs=attrs), target=target,
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            except Exception:
                print(f"COMPILE FAIL {tag}\n{traceback.format_exc()}", flush=True)
                bad += 1
                continue
            usage = "?"
            if cuobjdump.exists():
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(kern.asm["cubin"])
                    f.flush()
                    out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                                         text=True).stdout
                m = re.search(r"REG:(\d+) STACK:(\d+)", out)
                usage = f"regs {m.group(1)} stack {m.group(2)}" if m else "?"
                if m and int(m.group(2)) > 0:
                    print(f"SPILL {tag}: {usage}", flush=True)
                    bad += 1
            print(f"COMPILED {tag} sm_{arch}: {usage}, smem {kern.metadata.shared}", flush=True)
    return 1 if bad else 0


def run_checks(names) -> int:
    failed = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            CHECKS[name]()
            ok, detail = True, ""
        except Exception:  # report every check, then exit non-zero
            ok, detail = False, traceback.format_exc()
            failed += 1
        rec = {"check": name, "ok": ok, "secs": round(time.perf_counter() - t0, 2), "detail": detail}
        print("CHECK " + json.dumps(rec), flush=True)
    return 1 if failed else 0


# --------------------------------------------------------------------------- torch path (this process)

SHAPES = ((1, 1, 1, 1), (1, 1, 7, 5), (2, 5, 13, 97), (3, 17, 31, 200), (4, 9, 64, 129), (2, 33, 37, 300))


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 vocab entries (forward) and ~2 KiB (backward): many tiles and a
    partial last one even at test shapes."""
    s = sp()
    monkeypatch.setattr(s, "CONFIG", s.SpartonConfig(tile_bytes=1024, grad_tile_bytes=2048, align=16))
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_reference(small_tiles, shape, dtype):
    s = small_tiles
    B, S, D, V = shape
    rng = np.random.default_rng(hash(shape) % 2**32)
    for i, kind in enumerate(MASKS + MASKS[::-1]):  # each mask kind with and without bias
        bias = i < len(MASKS)
        h, w, b = make_data(rng, B, S, D, V, dtype, bias)
        m = make_mask(rng, B, S, kind)
        got = s.sparse_head(h, m, w, b)
        assert got.dtype == dtype and got.shape == (B, V)
        ref_w, _ = want(h, m, w, b)
        assert_close(f"{dtype} {shape} bias={bias} mask={kind}", np64(got), ref_w, TOL[dtype])
        if kind in ("ragged", "random") and B > 1:
            row = 1 if kind == "ragged" else B - 1
            assert torch.all(got[row] == 0), "an all-masked row must give exact zeros"


def test_default_tiles_and_bool_or_float_masks():
    """The shipped CONFIG (one vocab tile at these shapes) and masks of other dtypes."""
    s = sp()
    rng = np.random.default_rng(5)
    h, w, b = make_data(rng, 3, 11, 19, 1000, torch.float32, True)
    m = make_mask(rng, 3, 11, "random")
    ref_w, _ = want(h, m, w, b)
    for mm in (m, m.bool(), m.float(), m.to(torch.uint8)):
        assert_close(f"mask {mm.dtype}", np64(s.sparse_head(h, mm, w, b)), ref_w, TOL[torch.float32])
    assert s.sparse_head(h, m, w, b, out_dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_argmax_first_token_on_ties(small_tiles, dtype):
    rng = np.random.default_rng(6)
    seen = 0
    for B, S, D, V in SHAPES[2:]:
        for kind in MASKS:
            h, w, b = make_data(rng, B, S, D, V, dtype, bias=True, ints=True)
            m = make_mask(rng, B, S, kind)
            ref_w, ref_idx = want(h, m, w, b)
            for need in (True, False):
                got, idx = op(h, m, w, b, "torch", need)
                assert_close(f"{dtype} {(B, S, D, V)} {kind}", np64(got), ref_w, 1e-12 if dtype == torch.float64 else 1e-6)
                if need:
                    assert idx.dtype == torch.int32
                    bad = idx.numpy() != ref_idx
                    assert not bad.any(), f"{(B, S, D, V)} {kind}: argmax differs at {np.argwhere(bad)[:5].tolist()}"
                else:
                    assert idx.numel() == 0
            seen += n_ties(h, m, w, b)
    assert seen > 50, f"the data made only {seen} ties; the tie rule was not exercised"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradients_match_reference_autograd(small_tiles, shape):
    rng = np.random.default_rng(7)
    B, S, D, V = shape
    for i, kind in enumerate(MASKS):
        bias = i % 2 == 0
        h, w, b = make_data(rng, B, S, D, V, torch.float32, bias)
        m = make_mask(rng, B, S, kind)
        grads_vs_reference(f"{shape} bias={bias} mask={kind}", small_tiles.sparse_head, h, m, w, b, rng,
                           TOL[torch.float32])
    # Exact ties: the whole gradient goes to the first maximal token, as in the reference.
    h, w, b = make_data(rng, B, S, D, V, torch.float32, True, ints=True)
    grads_vs_reference(f"{shape} ties", small_tiles.sparse_head, h, make_mask(rng, B, S, "random"), w, b, rng, 1e-6)


def test_gradcheck_float64(small_tiles):
    s = small_tiles
    rng = np.random.default_rng(8)
    h, w, b = make_data(rng, 3, 5, 7, 19, torch.float64, True)
    m = make_mask(rng, 3, 5, "ragged")
    args = tuple(t.requires_grad_(True) for t in (h, w, b))
    assert torch.autograd.gradcheck(lambda h, w, b: s.sparse_head(h, m, w, b), args)


def test_some_inputs_without_grad(small_tiles):
    """Only the inputs that require grad get one, and they match the reference."""
    s = small_tiles
    rng = np.random.default_rng(9)
    h, w, b = make_data(rng, 2, 9, 11, 50, torch.float32, True)
    m = make_mask(rng, 2, 9, "full")
    g = torch.as_tensor(rng.standard_normal((2, 50)), dtype=torch.float32)
    hr, wr, br = (t.double().requires_grad_(True) for t in (h, w, b))
    reference.sparse_head_autograd(hr, m, wr, br).backward(g.double())
    for which in ("hidden", "weight", "bias"):
        hh, ww, bb = (t.clone().requires_grad_(name == which) for name, t in
                      (("hidden", h), ("weight", w), ("bias", b)))
        s.sparse_head(hh, m, ww, bb).backward(g)
        for name, t, r in (("hidden", hh, hr), ("weight", ww, wr), ("bias", bb, br)):
            if name == which:
                assert_close(f"only {which}", np64(t.grad), np64(r.grad), TOL[torch.float32])
            else:
                assert t.grad is None, f"{name} got a gradient though only {which} requires one"


def test_all_masked_zero_output_and_zero_gradient(small_tiles):
    s = small_tiles
    rng = np.random.default_rng(10)
    h, w, b = make_data(rng, 2, 4, 5, 30, torch.float32, True)
    b = b.abs() + 1.0  # every logit would be positive if a token counted
    leaves = [t.requires_grad_(True) for t in (h, w, b)]
    out = s.sparse_head(leaves[0], torch.zeros(2, 4), leaves[1], leaves[2])
    assert torch.equal(out, torch.zeros(2, 30))
    out.sum().backward()
    for t in leaves:
        assert torch.equal(t.grad, torch.zeros_like(t)), t.grad


def test_no_grad_keeps_no_argmax_and_backward_without_it_raises():
    s = sp()
    rng = np.random.default_rng(11)
    h, w, b = make_data(rng, 2, 3, 4, 9, torch.float32, True)
    w.requires_grad_(True)
    m = make_mask(rng, 2, 3, "full")
    with torch.no_grad():
        assert s.sparse_head(h, m, w, b).requires_grad is False
    out, idx = op(h, m, w, b, "torch", False)
    assert idx.numel() == 0
    with pytest.raises(RuntimeError, match="argmax was not kept"):
        out.sum().backward()


def test_never_allocates_the_logits(monkeypatch):
    """No op of the torch forward or backward makes a tensor beyond the tile budgets
    (the [B, S, V] logits are 16× bigger than anything allowed here)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    s = sp()
    monkeypatch.setattr(s, "CONFIG", s.SpartonConfig(tile_bytes=4096, grad_tile_bytes=4096, align=8))

    class Largest(TorchDispatchMode):
        numel, op = 0, None

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                    self.numel, self.op = t.numel(), func
            return out

    rng = np.random.default_rng(12)
    B, S, D, V = 2, 64, 8, 512
    h, w, b = make_data(rng, B, S, D, V, torch.float32, True)
    m = make_mask(rng, B, S, "random")
    keep = (m != 0).view(torch.uint8)
    allowed = max(B * V, V * D, B * S * D, 4096 // 4)  # outputs, dW, the kept rows, one tile
    with Largest() as mode:
        best, idx = s._torch_forward(h, keep, w, b, True)
    assert allowed * 16 <= B * S * V
    assert mode.numel <= allowed, f"forward: {mode.op} made {mode.numel} elements"
    with Largest() as mode:
        s._grad_from_argmax(h, w, best, idx, torch.ones(B, V), True, True, True)
    assert mode.numel <= allowed, f"backward: {mode.op} made {mode.numel} elements"


def test_topk():
    s = sp()
    rng = np.random.default_rng(13)
    h, w, b = make_data(rng, 3, 5, 7, 40, torch.float32, True)
    m = make_mask(rng, 3, 5, "random")  # last row all masked: no positive term
    full = s.sparse_head(h, m, w, b)
    vals, ids = s.sparse_head_topk(h, m, w, b, k=6)
    assert vals.shape == ids.shape == (3, 6) and ids.dtype == torch.int64
    assert torch.equal(vals, torch.sort(full, dim=1, descending=True).values[:, :6])
    has = ids >= 0
    assert torch.equal(vals[has], full.gather(1, ids.clamp_min(0))[has])
    assert torch.equal(has, vals > 0) and not has[2].any()
    for k in (0, 41, 2.0, True):
        with pytest.raises(ValueError, match=r"^k: "):
            s.sparse_head_topk(h, m, w, b, k=k)


def test_bad_inputs_name_the_argument():
    s = sp()
    h, w, b = torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(5)
    m = torch.ones(2, 3)
    cases = {
        "hidden": [(torch.zeros(2, 4), m, w, b), (h.long(), m, w, b), (torch.zeros(2, 3, 0), m, torch.zeros(5, 0), b)],
        "mask": [(h, torch.ones(3, 2), w, b), (h, torch.ones(2, 3, dtype=torch.complex64), w, b)],
        "weight": [(h, m, torch.zeros(5, 3), b), (h, m, w.double(), b), (h, m, torch.zeros(5), b)],
        "bias": [(h, m, w, torch.zeros(4)), (h, m, w, b.double())],
    }
    for name, calls in cases.items():
        for args in calls:
            with pytest.raises(ValueError, match=rf"^{name}: "):
                s.sparse_head(*args)


def test_backend_choice(monkeypatch):
    s = sp()
    cpu = torch.device("cpu")
    monkeypatch.delenv("EIGENWATCH_BACKEND", raising=False)
    assert s._choose_backend(cpu) == "torch"  # auto: CPU tensors never go to Triton compiled
    monkeypatch.setenv("EIGENWATCH_BACKEND", "torch")
    assert s._choose_backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("EIGENWATCH_BACKEND", "gpu")
    with pytest.raises(ValueError, match="EIGENWATCH_BACKEND"):
        s._choose_backend(cpu)
    monkeypatch.setenv("EIGENWATCH_BACKEND", " Auto ")
    assert s._choose_backend(cpu, torch.float64) == "torch"
    if s._kernel_module() is None:  # no CUDA and no interpreter: explicit triton must raise
        monkeypatch.setenv("EIGENWATCH_BACKEND", "triton")
        with pytest.raises(RuntimeError, match="EIGENWATCH_BACKEND=triton"):
            s.sparse_head(torch.zeros(1, 2, 3), torch.ones(1, 2), torch.zeros(4, 3))
    elif not torch.cuda.is_available():
        pytest.fail("the Triton kernel claims to run here without CUDA or the interpreter")


def test_opcheck():
    """torch.library's own checks: schema, fake kernel, autograd registration, AOT dispatch."""
    sp()
    rng = np.random.default_rng(14)
    for bias, need in ((False, True), (True, False)):
        h, w, b = make_data(rng, 2, 5, 6, 21, torch.float32, bias)
        m = (make_mask(rng, 2, 5, "random") != 0).view(torch.uint8)
        if need:
            h.requires_grad_(True)
            w.requires_grad_(True)
        torch.library.opcheck(torch.ops.eigenwatch.sparton_head.default, (h, m, w, b, "torch", need))


def _bench():
    spec = importlib.util.spec_from_file_location("_bench_sparton", ROOT / "bench" / "bench_sparton.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_cpu_case_smoke():
    """bench/bench_sparton.py's CPU case at a tiny shape: every method runs, errors are
    small, and the memory child (RSS high-water) reports every method."""
    bench = _bench()
    lines = bench.cpu_case(sp(), dict(B=2, S=8, D=16, V=300, dtype="float32", tiles=[4096]), 1)
    assert len(lines) == 1 + 6, lines
    for ln in lines[1:]:
        assert "× GEMM" in ln and "MiB" in ln, ln
        if "bare GEMM" not in ln:
            assert float(ln.rsplit("err ", 1)[1]) <= TOL[torch.float32], ln


# --------------------------------------------------------------------------- Triton (child processes)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _child(env_extra: dict, args=(), timeout=300) -> tuple[dict, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EW_TRITON_DEVICE",
                                                            "EIGENWATCH_BACKEND")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    env.update(env_extra)
    proc = subprocess.run([sys.executable, str(HERE), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CHECK "):
            rec = json.loads(line[6:])
            results[rec["check"]] = rec
    return results, proc


@pytest.fixture(scope="module")
def interpreted():
    return _child({"TRITON_INTERPRET": "1", "EW_TRITON_DEVICE": "cpu"})


@needs_triton
@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_interpreted(interpreted, name):
    results, proc = interpreted
    rec = results.get(name)
    if rec is None:
        pytest.fail(f"child (TRITON_INTERPRET=1) did not report {name!r}; exit {proc.returncode}\n"
                    f"stderr tail:\n{proc.stderr[-4000:]}")
    assert rec["ok"], f"{name} failed under TRITON_INTERPRET=1:\n{rec['detail']}"


@needs_triton
def test_interpreter_switched_after_import_is_refused():
    code = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from eigenwatch.kernels import _sparton_kernel as k, sparton as s\n"
        "assert k.interpreted() and not k.available()\n"
        "try:\n"
        "    k.forward(torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.uint8), torch.zeros(4, 3), None, False)\n"
        "except RuntimeError as e:\n"
        "    assert 'before triton is first imported' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('mixed interpreter state accepted')\n"
        "assert s._choose_backend(torch.device('cpu')) == 'torch'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EIGENWATCH_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@needs_triton
def test_kernel_compiles_for_sm90():
    """Lowering to PTX/cubin for H100/H200 (sm_90) with no GPU: what the interpreter cannot check."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    _, proc = _child({}, ("--compile", "90"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("COMPILED") == 8, proc.stdout  # bf16 ×2 configs, fp16, fp32; with/without argmax


@needs_triton
def test_triton_checks_compiled_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the interpreted run covers the kernel on CPU)")
    results, proc = _child({"EW_TRITON_DEVICE": "cuda"})
    failed = {n: r["detail"] for n, r in results.items() if not r["ok"]}
    assert set(results) == set(CHECKS), f"missing checks; stderr tail:\n{proc.stderr[-4000:]}"
    assert not failed, "\n".join(f"{n}:\n{d}" for n, d in failed.items())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile"]:
        sys.exit(compile_for(int(sys.argv[2])))
    sys.exit(run_checks(sys.argv[1:] or list(CHECKS)))
