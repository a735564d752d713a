"""The Triton window-spectra ops (kernels/triton_gram_update.py,
kernels/triton_eigvalsh.py) against float64 references (tests/reference.py).

Triton picks its interpreter when a function is decorated, from TRITON_INTERPRET
at that moment (its own tl.sort at `import triton`), and other test modules may
already have imported triton or this package. So every check runs in a child process started with
TRITON_INTERPRET=1 (this file run as a script); the pytest side starts it once
and reports each check as its own test. With a GPU the same checks also run
compiled, on CUDA (test_checks_compiled_on_cuda).

    TRITON_INTERPRET=1 python tests/test_triton_spectra.py [check ...]
    python tests/test_triton_spectra.py --compile 90    # lower for sm_90, no GPU needed

As a script it also runs from a bare checkout without eigenwatch installed (the
GPU machine): bench/_source.py imports the kernels from the tree.
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

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parent.parent
DEVICE = os.environ.get("EW_TRITON_DEVICE", "cpu")  # "cuda" for the compiled run
EIG_TOL = 1e-5  # fp32 solver: |λ - λ_ref| ≤ EIG_TOL · λ_max
E2E_TOL = 1e-4  # + fp32 Gram accumulation of raw rows
GRAM_TOL = 1e-5  # fp32 dot products: max |ΔG| ≤ GRAM_TOL · max |G|

sys.path.insert(0, str(ROOT / "bench"))
import _source  # noqa: E402

_source.ensure_kernels()
sys.path.insert(0, str(HERE.parent))
import reference  # noqa: E402

ref_gram = reference.raw_grams
ref_centred_eigvalsh = reference.centred_block_eigvalsh


def assert_close(name: str, got, want, atol: float, rtol: float = 0.0, show: int = 6) -> None:
    """Like np.testing.assert_allclose, but the message lists the first mismatches."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    bad = ~(np.abs(got - want) <= atol + rtol * np.abs(want))  # NaN counts as bad
    if bad.any():
        idx = np.argwhere(bad)[:show]
        lines = [f"  {tuple(int(j) for j in i)}: got {got[tuple(i)]:.9g} want {want[tuple(i)]:.9g} "
                 f"diff {got[tuple(i)] - want[tuple(i)]:.3g}" for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())}/{bad.size} mismatches (atol {atol:.3g}, rtol {rtol:.3g}), "
                             "first:\n" + "\n".join(lines))


# --------------------------------------------------------------------------- checks (run in the child)

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def _ts():
    """Both ops and their launch configs under one name, as the checks use them."""
    from types import SimpleNamespace

    from eigenwatch.kernels import _triton, triton_eigvalsh, triton_gram_update

    return SimpleNamespace(
        gram_update=triton_gram_update.gram_update, centred_eigvalsh=triton_eigvalsh.centred_eigvalsh,
        METHODS=triton_eigvalsh.METHODS, _update_config=triton_gram_update._config,
        _eig_config=triton_eigvalsh._config, _gram_update_kernel=triton_gram_update._gram_update_kernel,
        _centred_eigvalsh_kernel=triton_eigvalsh._centred_eigvalsh_kernel,
        available=lambda: triton_gram_update.available() and triton_eigvalsh.available(),
        _interpreted=lambda: _triton.interpreted(triton_eigvalsh._centred_eigvalsh_kernel))


def _t(a, dtype=None):
    import torch

    return torch.as_tensor(np.ascontiguousarray(a)).to(device=DEVICE, dtype=dtype)


def _np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


@check
def check_available():
    ts = _ts()
    assert ts.available(), "available() is False where the kernels run"
    want = os.environ.get("TRITON_INTERPRET") == "1"
    assert ts._interpreted() == want, f"interpreted={ts._interpreted()} but TRITON_INTERPRET={want}"


def _stream(ts, S, W, k, steps, rng, dtype=None):
    """Random updates of random distinct slots; returns ring, gram, the float64 mirror."""
    import torch

    dtype = dtype or torch.float32
    ring = _t(np.zeros((S, W, k)), torch.float32)
    gram = _t(np.zeros((S, W, W)), torch.float32)
    mirror = np.zeros((S, W, k))
    count = np.zeros(S, dtype=np.int64)
    for _ in range(steps):
        slots = rng.choice(S, size=int(rng.integers(1, S + 1)), replace=False)
        pos = count[slots] % W
        rows = _t(rng.standard_normal((len(slots), k)) + 3.0, dtype)  # uncentred on purpose
        ts.gram_update(ring, gram, rows, _t(slots), _t(pos))
        mirror[slots, pos] = _np(rows)
        count[slots] += 1
    return ring, gram, mirror


@check
def check_gram_update_matches_scratch():
    ts = _ts()
    rng = np.random.default_rng(1)
    for S, W, k in [(3, 31, 100), (4, 2, 1), (2, 32, 7), (5, 16, 33), (1, 3, 1), (3, 3, 100), (2, 64, 33)]:
        ring, gram, mirror = _stream(ts, S, W, k, 2 * W + 5, rng)
        tag = f"S{S} W{W} k{k}"
        assert_close(f"{tag} ring", _np(ring), mirror, atol=0.0)
        want = ref_gram(mirror)
        assert_close(f"{tag} gram", _np(gram), want, atol=GRAM_TOL * np.abs(want).max())
        g = _np(gram)
        assert np.array_equal(g, g.transpose(0, 2, 1)), f"{tag}: gram not exactly symmetric"


@check
def check_gram_update_low_precision_rows():
    import torch

    ts = _ts()
    rng = np.random.default_rng(2)
    for dtype in (torch.bfloat16, torch.float16):
        ring, gram, mirror = _stream(ts, 3, 16, 33, 40, rng, dtype)
        want = ref_gram(mirror)  # the mirror holds the rounded rows, upcast exactly
        assert_close(f"{dtype} ring", _np(ring), mirror, atol=0.0)
        assert_close(f"{dtype} gram", _np(gram), want, atol=GRAM_TOL * np.abs(want).max())


@check
def check_gram_update_skips_out_of_range():
    import torch

    ts = _ts()
    rng = np.random.default_rng(3)
    S, W, k = 3, 4, 5
    ring0 = rng.standard_normal((S, W, k))
    ring = _t(ring0, torch.float32)
    gram = _t(ref_gram(_np(ring)), torch.float32)
    before_ring, before_gram = _np(ring), _np(gram)
    rows = rng.standard_normal((4, k))
    # slot -1 (padding), slot S, pos W: skipped; the last entry is real.
    ts.gram_update(ring, gram, _t(rows, torch.float32), _t(np.array([-1, S, 1, 0])), _t(np.array([0, 1, W, 2])))
    want_ring = before_ring.copy()
    want_ring[0, 2] = _np(_t(rows[3], torch.float32))
    assert_close("ring", _np(ring), want_ring, atol=0.0)
    want_gram = before_gram.copy()
    want_gram[0] = ref_gram(want_ring[:1])[0]
    assert_close("gram", _np(gram), want_gram, atol=GRAM_TOL * np.abs(want_gram).max())
    untouched = _np(gram)[1:]
    assert np.array_equal(untouched, before_gram[1:]), "slots 1.. were written"
    ts.gram_update(ring, gram, _t(np.zeros((0, k)), torch.float32), _t(np.zeros(0, np.int64)),
                   _t(np.zeros(0, np.int64)))  # empty batch: no launch, no error


def _grams(rng, B, W, k, offset=1.0):
    x = rng.standard_normal((B, W, k)) + offset
    x[..., : min(3, k)] *= 5.0  # a few spikes above the bulk
    return ref_gram(x)


def _compare_eigs(tag, got, gram, valid, dim, W):
    for b in range(got.shape[0]):
        want = ref_centred_eigvalsh(gram[b], valid[b], dim, W)
        scale = max(want.max(), np.finfo(np.float32).tiny)
        assert_close(f"{tag} b{b} valid{valid[b]}", got[b], want, atol=EIG_TOL * scale)
        v = min(max(int(valid[b]), 0), W)
        assert np.all(got[b, v:] == 0.0), f"{tag} b{b}: non-zero entries past valid={v}: {got[b, v:]}"
        assert np.all(np.diff(got[b]) <= 0.0), f"{tag} b{b}: not descending: {got[b]}"


def _run_eig_cases(cases, methods):
    import torch

    ts = _ts()
    rng = np.random.default_rng(4)
    for method in methods:
        for B, W, k, valid in cases:
            gram = _grams(rng, B, W, k).astype(np.float32)
            poisoned = gram.copy()
            for b, v in enumerate(valid):  # entries outside the valid block must never be read
                poisoned[b, v:, :] = np.nan
                poisoned[b, :, v:] = np.nan
            got = ts.centred_eigvalsh(_t(poisoned), _t(np.array(valid, np.int64)), k, method=method)
            assert got.shape == (B, W) and got.dtype == torch.float32, f"{got.shape} {got.dtype}"
            _compare_eigs(f"{method} B{B} W{W} k{k}", _np(got), gram.astype(np.float64), valid, k, W)


@check
def check_centred_eigvalsh_matches_numpy():
    cases = [(1, 2, 7, [2]), (3, 3, 1, [3, 2, 3]), (3, 16, 33, [16, 9, 2]), (1, 31, 100, [31]),
             (3, 32, 7, [32, 31, 17]), (1, 16, 1, [16])]
    _run_eig_cases(cases, _ts().METHODS)


@check
def check_centred_eigvalsh_w64():
    _run_eig_cases([(2, 64, 100, [64, 37]), (1, 33, 33, [33])], _ts().METHODS)


@check
def check_centred_eigvalsh_hard_spectra():
    """Wide dynamic range and repeated eigenvalues (Jacobi must not stall on ties)."""
    ts = _ts()
    rng = np.random.default_rng(5)
    W, dim = 32, 7
    grams = []
    for lam in (np.logspace(-6, 3, W), np.repeat([5.0, 1.0, 1e-3, 0.0], W // 4)):
        q, _ = np.linalg.qr(rng.standard_normal((W, W)))
        grams.append((q * lam) @ q.T)
    gram = np.stack(grams).astype(np.float32)
    valid = [W, W]
    for method in ts.METHODS:
        got = ts.centred_eigvalsh(_t(gram), _t(np.array(valid)), dim, method=method)
        _compare_eigs(f"{method} hard", _np(got), gram.astype(np.float64), valid, dim, W)


@check
def check_centred_eigvalsh_edge_cases():
    import torch

    ts = _ts()
    rng = np.random.default_rng(6)
    W, k = 4, 6
    g = _grams(rng, 1, W, k)[0].astype(np.float32)
    gram = np.stack([g] * 4)
    got = _np(ts.centred_eigvalsh(_t(gram), _t(np.array([0, 1, W + 5, W], np.int32)), k))
    assert np.all(got[:2] == 0.0), f"valid 0/1 must give zeros: {got[:2]}"
    assert np.array_equal(got[2], got[3]), f"valid > W must clamp to W: {got[2]} vs {got[3]}"
    # Identical rows: stored minus the reference row they are all zero, and the
    # spectrum is exactly 0; stored raw, it is 0 up to the rounding of the means.
    zero = _np(ts.centred_eigvalsh(_t(np.zeros((1, W, W)), torch.float32), _t(np.array([W])), k))
    assert np.all(zero == 0.0), f"a zero Gram must give an exactly zero spectrum: {zero}"
    x = np.tile(rng.standard_normal((1, 1, k)), (1, W, 1))
    g_same = ref_gram(x)
    got = _np(ts.centred_eigvalsh(_t(g_same, torch.float32), _t(np.array([W])), k))
    assert np.all(np.abs(got) <= 1e-6 * g_same.max() / k), f"identical rows: {got}"
    # W = 1 and dim scaling.
    one = _np(ts.centred_eigvalsh(_t(np.ones((2, 1, 1)), torch.float32), _t(np.array([1, 1])), 3))
    assert one.shape == (2, 1) and np.all(one == 0.0), one
    a = _np(ts.centred_eigvalsh(_t(gram[:1]), _t(np.array([W])), 1))
    b = _np(ts.centred_eigvalsh(_t(gram[:1]), _t(np.array([W])), np.int64(k)))
    assert_close("dim scaling", a, b * k, atol=EIG_TOL * a.max())
    # out=: written in place and returned (a persistent buffer in a CUDA graph).
    buf = _t(np.full((1, W), -7.0), torch.float32)
    res = ts.centred_eigvalsh(_t(gram[:1]), _t(np.array([W])), k, out=buf)
    assert res is buf and np.array_equal(_np(buf), b), (_np(buf), b)


@check
def check_nan_propagates():
    ts = _ts()
    rng = np.random.default_rng(7)
    gram = _grams(rng, 2, 16, 9).astype(np.float32)
    gram[0, 3, 5] = gram[0, 5, 3] = np.nan
    got = _np(ts.centred_eigvalsh(_t(gram), _t(np.array([16, 16])), 9))
    assert np.isnan(got[0]).any(), f"NaN input came out as numbers: {got[0]}"
    _compare_eigs("clean row", got[1:], gram[1:].astype(np.float64), [16], 9, 16)


@check
def check_end_to_end_vs_window_eigenvalues():
    """Stream rows (stored minus a per-slot reference row, ring position t % W),
    then compare with the project reference on the last W raw rows, in order."""
    import torch

    ts = _ts()
    rng = np.random.default_rng(8)
    S, W, k = 3, 16, 33
    totals = [5, 16, 40]
    raw = [rng.standard_normal((n, k)) * 0.5 + 2.0 for n in totals]  # far from centred
    ref_row = [r[0] for r in raw]
    ring = _t(np.zeros((S, W, k)), torch.float32)
    gram = _t(np.zeros((S, W, W)), torch.float32)
    for t in range(max(totals)):
        slots = np.array([s for s in range(S) if t < totals[s]])
        rows = np.stack([raw[s][t] - ref_row[s] for s in slots])
        ts.gram_update(ring, gram, _t(rows, torch.float32), _t(slots), _t(np.full(len(slots), t % W)))
    valid = np.minimum(totals, W)
    got = _np(ts.centred_eigvalsh(gram, _t(valid), k))
    for s in range(S):
        want = np.zeros(W)
        want[: valid[s]] = reference.window_eigenvalues(raw[s][-W:])
        assert_close(f"slot {s} ({totals[s]} rows)", got[s], want, atol=E2E_TOL * want.max())


@check
def check_bad_inputs():
    import torch

    ts = _ts()
    f32 = torch.float32

    def z(*shape, dtype=f32):
        return torch.zeros(*shape, dtype=dtype, device=DEVICE)

    ring, gram, rows, idx = z(2, 4, 8), z(2, 4, 4), z(3, 8), z(3, dtype=torch.int64)
    update_cases = {
        "ring": [(z(4, 8), gram, rows, idx, idx), (z(2, 4, 8, dtype=torch.float64), gram, rows, idx, idx),
                 (z(2, 65, 8), z(2, 65, 65), rows, idx, idx), (z(2, 4, 0), gram, z(3, 0), idx, idx)],
        "gram": [(ring, z(2, 4, 5), rows, idx, idx), (ring, z(2, 4, 4, dtype=torch.float64), rows, idx, idx)],
        "rows": [(ring, gram, z(3, 7), idx, idx), (ring, gram, z(3, 8, dtype=torch.int32), idx, idx),
                 (ring, gram, z(3, 16)[:, ::2], idx, idx)],
        "slots": [(ring, gram, rows, z(2, dtype=torch.int64), idx), (ring, gram, rows, z(3), idx)],
        "pos": [(ring, gram, rows, idx, z(4, dtype=torch.int64)), (ring, gram, rows, idx, z(3, dtype=torch.int16))],
    }
    valid = z(2, dtype=torch.int64)
    eig_cases = {
        "gram": [((z(4, 4), valid, 8), {}), ((z(2, 4, 5), valid, 8), {}),
                 ((z(2, 4, 4, dtype=torch.float64), valid, 8), {}), ((z(2, 65, 65), valid, 8), {})],
        "valid": [((gram, z(3, dtype=torch.int64), 8), {}), ((gram, z(2), 8), {})],
        "dim": [((gram, valid, 0), {}), ((gram, valid, 2.5), {}), ((gram, valid, True), {})],
        "method": [((gram, valid, 8), {"method": "qr"})],
        "tol": [((gram, valid, 8), {"tol": 1.0})],
        "max_sweeps": [((gram, valid, 8), {"max_sweeps": 0})],
        "out": [((gram, valid, 8), {"out": z(2, 5)}), ((gram, valid, 8), {"out": z(2, 4, dtype=torch.float64)})],
    }
    calls = [(name, ts.gram_update, args, {}) for name, cs in update_cases.items() for args in cs]
    calls += [(name, ts.centred_eigvalsh, args, kw) for name, cs in eig_cases.items() for args, kw in cs]
    for name, fn, args, kw in calls:
        try:
            fn(*args, **kw)
        except ValueError as e:
            assert str(e).startswith(f"{name}:"), f"{fn.__name__}: message should name {name!r}: {e}"
        else:
            raise AssertionError(f"{fn.__name__}: bad {name!r} was accepted")


@check
def check_bench_code_paths():
    """bench/gpu_spectra.py's per-case code, on tiny shapes with a wall-clock timer."""
    import torch

    spec = importlib.util.spec_from_file_location("_gpu_spectra_bench", ROOT / "bench" / "gpu_spectra.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lines = bench.bench_case(bench.load_kernels(), 2, 3, 5, torch.bfloat16, DEVICE, bench.wall_ms)
    assert len(lines) == 1 and "svdvals" in lines[0] and "ours" in lines[0], lines
    err = float(lines[0].rsplit("err ", 1)[1])
    assert err <= EIG_TOL, lines[0]


def compile_for(arch: int) -> int:
    """Compile every kernel configuration the wrappers can launch for CUDA sm_<arch>
    with Triton's bundled ptxas (no GPU needed); print registers and spill stack.
    Catches lowering errors the interpreter cannot see. Exit 1 on an error or a
    spill in a default-method kernel."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ts = _ts()
    target = GPUTarget("cuda", arch, 32)
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    jobs = []
    for w in (1, 3, 32, 64):
        for k, rows in ((1, "*fp32"), (4096, "*bf16"), (100, "*fp16")):
            bw, bk, warps = ts._update_config(w, k)
            sig = {"ring_ptr": "*fp32", "gram_ptr": "*fp32", "rows_ptr": rows, "slots_ptr": "*i64",
                   "pos_ptr": "*i32", "S": "i32", "W": "i32", "K": "i32", "BLOCK_W": "constexpr",
                   "BLOCK_K": "constexpr"}
            jobs.append((f"gram_update W{w} k{k} {rows}", ts._gram_update_kernel, sig,
                         {"BLOCK_W": bw, "BLOCK_K": bk}, warps, True))
    for w in (16, 32, 64):
        n, warps = ts._eig_config(w)
        for method in ts.METHODS:
            sig = {"gram_ptr": "*fp32", "valid_ptr": "*i64", "out_ptr": "*fp32", "W": "i32", "inv_dim": "fp32",
                   "tol2": "fp32", "max_sweeps": "i32", "N": "constexpr", "METHOD": "constexpr"}
            jobs.append((f"centred_eigvalsh N{n} {method}", ts._centred_eigvalsh_kernel, sig,
                         {"N": n, "METHOD": method}, warps, method == ts.METHODS[0]))
    bad = 0
    for tag, fn, sig, consts, warps, no_spill in jobs:
        try:
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                                    options={"num_warps": warps})
        except Exception:
            print(f"COMPILE FAIL {tag}\n{traceback.format_exc()}", flush=True)
            bad += 1
            continue
        usage = "?"
        if cuobjdump.exists():
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                                       text=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            usage = f"regs {m.group(1)} stack {m.group(2)}" if m else "?"
            if no_spill and m and int(m.group(2)) > 0:
                print(f"SPILL {tag}: {usage}", flush=True)
                bad += 1
        print(f"COMPILED {tag} sm_{arch} warps {warps}: {usage}", flush=True)
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


# --------------------------------------------------------------------------- pytest side

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _child(env_extra: dict, names=(), timeout=600) -> tuple[dict, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EW_TRITON_DEVICE")}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, str(HERE), *names], env=env, capture_output=True, text=True,
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


@pytest.mark.parametrize("name", list(CHECKS))
def test_interpreted(interpreted, name):
    results, proc = interpreted
    rec = results.get(name)
    if rec is None:
        pytest.fail(f"child (TRITON_INTERPRET=1) did not report {name!r}; exit {proc.returncode}\n"
                    f"stderr tail:\n{proc.stderr[-4000:]}")
    assert rec["ok"], f"{name} failed under TRITON_INTERPRET=1:\n{rec['detail']}"


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


def test_cpu_tensors_need_the_interpreter():
    """Without TRITON_INTERPRET (and without CUDA) nothing runs, and a CPU
    tensor is refused with a message saying what to do."""
    if not _no_cuda():
        pytest.skip("CUDA present: CPU tensors are never launched there either, but available() is True")
    code = (
        "import torch\n"
        "from eigenwatch.kernels import triton_eigvalsh as ts\n"
        "assert not ts.available()\n"
        "try:\n"
        "    ts.centred_eigvalsh(torch.zeros(1, 4, 4), torch.full((1,), 4), 8)\n"
        "except ValueError as e:\n"
        "    assert str(e).startswith('gram:') and 'TRITON_INTERPRET' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('CPU tensor accepted without the interpreter')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_interpreter_switched_after_import_is_refused():
    """TRITON_INTERPRET set after `import triton`: triton's own tl.sort stays
    compiled while our kernels get interpreted, so launches would fail; say so."""
    code = (
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from eigenwatch.kernels import _triton, triton_eigvalsh as ts\n"
        "assert _triton.interpreted(ts._centred_eigvalsh_kernel) and not ts.available()\n"
        "try:\n"
        "    ts.centred_eigvalsh(torch.zeros(1, 4, 4), torch.full((1,), 4), 8)\n"
        "except RuntimeError as e:\n"
        "    assert 'before triton is first imported' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('mixed interpreter state accepted')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_bench_script_without_cuda():
    if not _no_cuda():
        pytest.skip("CUDA present: the real benchmark takes minutes; run it by hand")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_spectra.py")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0], proc.stdout


def test_kernels_compile_for_sm90():
    """Lowering to PTX/cubin for H100/H200 (sm_90), with no GPU: what the interpreter cannot check."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    proc = subprocess.run([sys.executable, str(HERE), "--compile", "90"], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("COMPILED") == 18, proc.stdout


def test_checks_compiled_on_cuda():
    if _no_cuda():
        pytest.skip("needs a CUDA GPU (the interpreted run above covers the kernels on CPU)")
    results, proc = _child({"EW_TRITON_DEVICE": "cuda"})
    failed = {n: r["detail"] for n, r in results.items() if not r["ok"]}
    assert set(results) == set(CHECKS), f"missing checks; stderr tail:\n{proc.stderr[-4000:]}"
    assert not failed, "\n".join(f"{n}:\n{d}" for n, d in failed.items())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile"]:
        sys.exit(compile_for(int(sys.argv[2])))
    sys.exit(run_checks(sys.argv[1:] or list(CHECKS)))
