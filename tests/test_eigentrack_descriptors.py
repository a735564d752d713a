"""EigenTrack descriptors appended to kernels/descriptors.py (gap23_rel,
spikes_tw, kl_mp, w1_mp, sigma2_mppca_rel, row_norm_mean, l12_proxy,
nuclear_rel) and the row norms the taps' window spectra carry.

Every numeric value is checked against an independent float64 reference
(tests/reference.py; scipy: MP CDF by quadrature in θ, TW1 by a Fredholm
determinant, SVD / row norms of the window itself), never against the module
under test.
The statistics (false alarms of spikes_tw on pure noise, detection of a planted
spike) are measured on seeded, batched simulations.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eigenwatch.kernels import descriptors as desc_mod
from eigenwatch.kernels.descriptors import DESCRIPTOR_DOCS, DESCRIPTOR_NAMES, INDEX, describe
from eigenwatch.kernels.gram import spectra
from eigenwatch.kernels.window_bank import WindowBank

import reference
from reference import mp_quantile as ref_mp_quantile
from reference import sigma2_iqr as ref_sigma2_iqr
from reference import window_norm_features as ref_window_features

REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

NEW_NAMES = ("gap23_rel", "spikes_tw", "kl_mp", "w1_mp", "sigma2_mppca_rel", "row_norm_mean", "l12_proxy",
             "nuclear_rel")
LEGACY_NAMES = ("lambda1", "lambda1_rel", "lambda2_rel", "lambda3_rel", "gap12_rel", "ratio12", "spectral_entropy",
                "effective_rank", "eig_variance_rel", "trace_mean", "sigma2", "mp_edge", "spikes", "gamma", "window")
SCALE_FREE_NEW = ("gap23_rel", "spikes_tw", "kl_mp", "w1_mp", "sigma2_mppca_rel", "l12_proxy", "nuclear_rel")
ALPHA = 0.01


# --------------------------------------------------------------------------- references


def ref_tw_unit_margin(p: int, n: int, alpha: float = ALPHA) -> float:
    return reference.tw_margin(p, n, alpha)


def ref_new_features(eigs, window: int, dim: int, rows=None) -> dict[str, float]:
    """The appended descriptors of the reference (tests/reference.py: describe)."""
    full = reference.describe(eigs, window, dim, rows)
    return {n: full[n] for n in NEW_NAMES}


def window_spectrum(x) -> tuple[np.ndarray, np.ndarray]:
    """float64 (eigenvalues, row_sq_norms) of a window [W, d]."""
    return reference.window_spectrum(np.asarray(x, dtype=np.float64))


def assert_features(got: np.ndarray, want: dict[str, float], *, rtol=1e-6, atol=1e-10, label=""):
    bad = [f"  {n}: got {got[INDEX[n]]!r} want {w!r}" for n, w in want.items()
           if not abs(got[INDEX[n]] - w) <= atol + rtol * abs(w)]
    assert not bad, f"{label}:\n" + "\n".join(bad)


def centred_batch(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, W, d] windows -> (eigs [B, W] descending, row_sq_norms [B, W]), centred
    as the tap does (Xc = X − mean row), Gram / d, batched eigvalsh."""
    d = x.shape[-1]
    xc = x - x.mean(axis=1, keepdims=True)
    gram = xc @ xc.transpose(0, 2, 1) / d
    return np.linalg.eigvalsh(gram)[:, ::-1], np.diagonal(gram, axis1=1, axis2=2).copy()


def random_token_directions(rng, batch: int, w: int) -> np.ndarray:
    """Uniform unit vectors in the centred token subspace (u ⟂ 1), [B, W]."""
    u = rng.standard_normal((batch, w))
    u -= u.mean(axis=1, keepdims=True)
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def plant_token_spike(z: np.ndarray, u: np.ndarray, ell: float) -> np.ndarray:
    """X = (I + (√ℓ−1)uuᵀ) Z: every column of X has token covariance I + (ℓ−1)uuᵀ."""
    return z + (math.sqrt(ell) - 1) * u[:, :, None] * np.einsum("bw,bwd->bd", u, z)[:, None, :]


# --------------------------------------------------------------------------- names and docs


def test_names_order_and_docs():
    assert DESCRIPTOR_NAMES[: len(LEGACY_NAMES)] == LEGACY_NAMES  # wire format: old names first, unchanged
    assert DESCRIPTOR_NAMES[len(LEGACY_NAMES):] == NEW_NAMES
    assert len(DESCRIPTOR_NAMES) == 23
    assert DESCRIPTOR_NAMES == tuple(DESCRIPTOR_DOCS) and all(DESCRIPTOR_DOCS[n] for n in DESCRIPTOR_NAMES)
    assert all(DESCRIPTOR_NAMES[INDEX[n]] == n for n in DESCRIPTOR_NAMES)


def test_descriptors_module_imports_and_describes_with_numpy_only():
    """Sidecar-style import with scipy, torch and TracyWidom blocked: importing
    is numpy-only, and describe() still works (spikes_tw on the MP-edge
    fallback, one RuntimeWarning)."""
    code = textwrap.dedent("""
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('scipy', 'torch', 'TracyWidom'):
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from eigenwatch.kernels import descriptors as D
        assert not any(m.split('.')[0] in ('scipy', 'torch') for m in sys.modules), 'heavy import'
        rng = np.random.default_rng(0)
        e = np.sort(rng.uniform(0.5, 1.5, 32))[::-1]; e[0] = 6.0; e[-1] = 0.0
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter('always')
            a = D.describe(e, 32, 256)
            b = D.describe(e, 32, 256)
        assert np.all(np.isfinite(a)) and np.array_equal(a, b)
        msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
        assert len(msgs) == 1 and 'tracywidom' in msgs[0], msgs
        print(repr(float(a[D.INDEX['spikes_tw']])), repr(D.sigma2_iqr(e[:31], 31 / 256)))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    spikes_tw, s2 = map(float, res.stdout.split())
    e = np.sort(np.random.default_rng(0).uniform(0.5, 1.5, 32))[::-1]
    e[0], e[-1] = 6.0, 0.0
    edge = (1 + math.sqrt(31 / 256)) ** 2
    assert s2 == pytest.approx(ref_sigma2_iqr(e[:31], 31 / 256), rel=1e-6)
    assert spikes_tw == float(np.sum(e[:31] > s2 * edge))


def test_tw_fallback_in_process_warns_once(monkeypatch):
    from eigenwatch.kernels import rmt

    x = np.random.default_rng(5).standard_normal((16, 64))
    eigs, rows = window_spectrum(x)
    desc_mod._reset_tw_cache()
    rmt._tw1.cache_clear()
    monkeypatch.setitem(sys.modules, "TracyWidom", None)  # `import TracyWidom` raises ImportError
    try:
        with pytest.warns(RuntimeWarning, match="tracywidom") as rec:
            got = [describe(eigs, 16, 64, row_sq_norms=rows) for _ in range(3)]
        assert len([r for r in rec if issubclass(r.category, RuntimeWarning)]) == 1
        nz = np.sort(eigs)[::-1][:15]
        s2 = ref_sigma2_iqr(nz, 15 / 64)
        assert got[0][INDEX["spikes_tw"]] == float(np.sum(nz > s2 * (1 + math.sqrt(15 / 64)) ** 2))
    finally:
        monkeypatch.delitem(sys.modules, "TracyWidom")
        desc_mod._reset_tw_cache()
        rmt._tw1.cache_clear()
    # back with tracywidom: the TW margin again
    d = describe(eigs, 16, 64, row_sq_norms=rows)
    assert_features(d, ref_new_features(eigs, 16, 64, rows), label="after fallback")


# --------------------------------------------------------------------------- the taps' row norms


@pytest.mark.parametrize("w,d", [(2, 1), (3, 9), (16, 15), (32, 256), (64, 7)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_tap_row_norms_match_the_window(w, d, dtype):
    """The row squared norms the taps hand to describe() (the diagonal of the
    centred window Gram / d, kernels/gram.py) against the rows themselves."""
    rng = np.random.default_rng(7 * w + d)
    x = torch.from_numpy(rng.standard_normal((w, d)) * 2.0 + rng.normal(3.0, 1.0, size=d)).to(dtype)
    bank = WindowBank(w, d, max_slots=1, initial_slots=1)
    bank.extend(0, x, [])
    grams, valid = bank.window_gram([0])
    eigs, rows, ok = spectra(grams, valid, 1.0 / d)
    eigs, rows = eigs[0].numpy(), rows[0].numpy()
    ref = ref_window_features(x.to(torch.float64).numpy())
    scale = max(float(ref["row_sq_norms"].max()), 1e-300)
    np.testing.assert_allclose(rows, ref["row_sq_norms"], rtol=2e-5, atol=2e-6 * scale)
    assert float(rows.sum()) == pytest.approx(float(eigs.sum()), rel=1e-5)  # trace; clamped rounding noise aside
    # equal rows: exactly zero
    bank.reset(0)
    bank.extend(0, torch.full((w, d), 3.7, dtype=dtype), [])
    grams, valid = bank.window_gram([0])
    e, r, _ = spectra(grams, valid, 1.0 / d)
    assert not e.any() and not r.any()


# --------------------------------------------------------------------------- values vs references


SHAPES = [(2, 1), (2, 50), (3, 9), (4, 300), (8, 16), (16, 15), (32, 256), (33, 32), (64, 64), (64, 7), (40, 2),
          (48, 1024)]


@pytest.mark.parametrize("w,d", SHAPES)
@pytest.mark.parametrize("kind", ["noise", "spiked", "offset"])
def test_new_features_match_reference(w, d, kind):
    rng = np.random.default_rng(101 * w + d)
    x = rng.standard_normal((w, d)) * rng.uniform(0.5, 2.0, size=d)
    if kind == "spiked":
        x += 2.0 * np.outer(rng.standard_normal(w), rng.standard_normal(d))
        x += 1.2 * np.outer(rng.standard_normal(w), rng.standard_normal(d))
    elif kind == "offset":
        x += rng.normal(50.0, 5.0, size=d)  # the common mean the centring removes
    eigs, rows = window_spectrum(x)
    win = ref_window_features(x)
    got = describe(eigs, w, d, row_sq_norms=rows)
    assert got.dtype == np.float64 and np.all(np.isfinite(got))
    want = ref_new_features(eigs, w, d, win["row_sq_norms"])
    assert_features(got, want, rtol=1e-5, atol=1e-9, label=f"W={w} d={d} {kind}")
    # norm features straight from the window: row norms and singular values
    assert_features(got, {k: win[k] for k in ("row_norm_mean", "l12_proxy", "nuclear_rel")}, rtol=1e-9,
                    label="window norms")
    assert got[INDEX["nuclear_rel"]] <= got[INDEX["l12_proxy"]] * (1 + 1e-12) <= 1 + 1e-12
    # the same without row norms: the documented trace fallbacks, everything else unchanged
    bare = describe(eigs, w, d)
    assert bare[INDEX["row_norm_mean"]] == pytest.approx(math.sqrt(eigs.sum() / w), rel=1e-9)
    assert bare[INDEX["l12_proxy"]] == 1.0
    others = [i for n, i in INDEX.items() if n not in ("row_norm_mean", "l12_proxy")]
    assert np.array_equal(bare[others], got[others])
    assert_features(bare, ref_new_features(eigs, w, d), rtol=1e-5, atol=1e-9, label=f"bare W={w} d={d} {kind}")


def test_hand_computed_spectrum():
    # W=5, d=10: non-zero eigenvalues [4, 2, 1, 1] (+ the centring zero), γ = 0.4
    eigs = np.array([1.0, 0.0, 4.0, 1.0, 2.0])
    rows = np.array([2.0, 1.0, 1.0, 2.0, 2.0])  # Σ = 8 = Σλ
    got = describe(eigs, 5, 10, row_sq_norms=rows)
    assert got[INDEX["gap23_rel"]] == pytest.approx(0.5, rel=1e-12)  # (2 − 1)/2
    assert got[INDEX["nuclear_rel"]] == pytest.approx((2 + math.sqrt(2) + 2) / math.sqrt(40), rel=1e-12)
    assert got[INDEX["row_norm_mean"]] == pytest.approx((3 * math.sqrt(2) + 2) / 5, rel=1e-12)
    assert got[INDEX["l12_proxy"]] == pytest.approx((3 * math.sqrt(2) + 2) / math.sqrt(40), rel=1e-12)
    # MP-PCA (p = 4 ≤ n = 10): at k = 0 the spread 4 − 1 = 3 ≤ 4·√(4/10)·2 ≈ 5.06, so σ² = mean = 2
    assert got[INDEX["sigma2_mppca_rel"]] == pytest.approx(1.0, rel=1e-12)
    # σ²_iqr: ascending [1, 1, 2, 4], levels [.125, .375, .625, .875] -> ranks 1, 2
    s2 = 3.0 / float(ref_mp_quantile([0.375, 0.625], 0.4).sum())
    m = ref_tw_unit_margin(4, 10)
    assert got[INDEX["spikes_tw"]] == float(np.sum(np.array([4.0, 2, 1, 1]) > s2 * m))


@pytest.mark.parametrize("w,d", [(2, 3), (5, 10), (64, 7), (33, 32)])
def test_zero_variance_window_gives_zero_new_features(w, d):
    for rows in (None, np.zeros(w)):
        got = describe(np.zeros(w), w, d, row_sq_norms=rows)
        for n in NEW_NAMES:
            assert got[INDEX[n]] == 0.0, n


def test_rank_deficient_window_fallbacks():
    # rows take two values: rank-1 Gram; median eigenvalue 0 -> σ² = 0
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(40), rng.standard_normal(40)
    x = np.stack([a, b, a, a, b, b, a, b, a, a])
    eigs, rows = window_spectrum(x)
    got = describe(eigs, 10, 40, row_sq_norms=rows)
    assert np.all(np.isfinite(got))
    assert got[INDEX["sigma2"]] == 0.0 and got[INDEX["spikes_tw"]] == 1.0 and got[INDEX["gap23_rel"]] == 0.0
    assert_features(got, ref_new_features(eigs, 10, 40, ref_window_features(x)["row_sq_norms"]), rtol=1e-6,
                    label="rank 1")
    # rank 1: the nuclear norm is the Frobenius norm
    assert got[INDEX["nuclear_rel"]] == pytest.approx(1 / math.sqrt(10), rel=1e-9)


# --------------------------------------------------------------------------- bad input


def test_row_sq_norms_validation():
    x = np.random.default_rng(1).standard_normal((6, 20))
    eigs, rows = window_spectrum(x)
    describe(eigs, 6, 20, row_sq_norms=list(rows))  # any array-like
    cases = [
        (rows[:5], "expected 6 values"),
        (rows.reshape(2, 3), "expected 6 values"),
        (np.r_[rows[:5], np.nan], "NaN or Inf"),
        (np.r_[rows[:5], np.inf], "NaN or Inf"),
        (np.r_[rows[:5], -1.0], "non-negative"),
        (rows * 20, "does not match the trace"),  # ‖Xc_i‖² without the / d
        (rows + 1.0, "does not match the trace"),  # rows not centred
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=rf"^row_sq_norms: .*{match}"):
            describe(eigs, 6, 20, row_sq_norms=bad)
    with pytest.raises(ValueError, match="row_sq_norms"):
        describe(np.zeros(6), 6, 20, row_sq_norms=np.full(6, 1e-3))
    # the three positional arguments still work, keyword only for the new one
    with pytest.raises(TypeError):
        describe(eigs, 6, 20, rows)  # noqa


# --------------------------------------------------------------------------- invariances (hypothesis)


@st.composite
def windows(draw):
    w = draw(st.integers(2, 40))
    d = draw(st.integers(1, 80))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((w, d)) * rng.uniform(0.2, 5.0, size=(w, 1))
    if draw(st.booleans()):
        x += 3.0 * np.outer(rng.standard_normal(w), rng.standard_normal(d))
    return x + rng.standard_normal(d) * draw(st.sampled_from([0.0, 1.0, 100.0]))


def spectrum_np(x):
    return window_spectrum(x)


@PROPERTY
@given(windows(), st.floats(1e-3, 1e3))
def test_property_scale_invariance(x, c):
    w, d = x.shape
    e1, r1 = spectrum_np(x)
    e2, r2 = spectrum_np(c * x)
    for rows1, rows2 in ((r1, r2), (None, None)):
        d1 = describe(e1, w, d, row_sq_norms=rows1)
        d2 = describe(e2, w, d, row_sq_norms=rows2)
        for name in SCALE_FREE_NEW:
            assert d2[INDEX[name]] == pytest.approx(d1[INDEX[name]], rel=1e-7, abs=1e-12), name
        assert d2[INDEX["row_norm_mean"]] == pytest.approx(c * d1[INDEX["row_norm_mean"]], rel=1e-7)


@PROPERTY
@given(windows(), st.randoms(use_true_random=False))
def test_property_token_permutation_invariance(x, rnd):
    w, d = x.shape
    perm = list(range(w))
    rnd.shuffle(perm)
    e1, r1 = spectrum_np(x)
    e2, r2 = spectrum_np(x[perm])
    d1 = describe(e1, w, d, row_sq_norms=r1)
    d2 = describe(e2, w, d, row_sq_norms=r2)
    assert d1[INDEX["spikes_tw"]] == d2[INDEX["spikes_tw"]]
    np.testing.assert_allclose(d2, d1, rtol=1e-7, atol=1e-12)
    # and the row norms in any order
    assert np.array_equal(describe(e1, w, d, row_sq_norms=r1[::-1]), d1)


@PROPERTY
@given(windows())
def test_property_norm_ratios_are_ordered(x):
    w, d = x.shape
    e, r = spectrum_np(x)
    got = describe(e, w, d, row_sq_norms=r)
    p = min(w - 1, d)
    nuc, l12 = got[INDEX["nuclear_rel"]], got[INDEX["l12_proxy"]]
    assert 0.0 <= nuc <= l12 * (1 + 1e-9) and l12 <= 1 + 1e-12
    assert nuc <= math.sqrt(p / w) * (1 + 1e-9)
    assert got[INDEX["kl_mp"]] >= 0 and got[INDEX["w1_mp"]] >= 0 and got[INDEX["sigma2_mppca_rel"]] >= 0


# --------------------------------------------------------------------------- statistics


def test_spikes_tw_false_alarm_rate_on_pure_noise():
    """≥ 10,000 Gaussian windows W=32, d=256, centred as the tap does: the share
    with spikes_tw > 0 is alpha = 1% ± 1 point. Also reports what the median σ²
    (the `sigma2` descriptor) and the true σ² = 1 would give with the same margin."""
    w, d, total, chunk = 32, 256, 10_000, 1_000
    rng = np.random.default_rng(20250101)
    unit = ref_tw_unit_margin(w - 1, d)
    tw, med, true = [], [], []
    for _ in range(total // chunk):
        eigs, rows = centred_batch(rng.standard_normal((chunk, w, d)))
        for e, r in zip(eigs, rows):
            out = describe(e, w, d, row_sq_norms=r)
            tw.append(out[INDEX["spikes_tw"]])
            med.append(e[0] > out[INDEX["sigma2"]] * unit)
        true.append(eigs[:, 0] > unit)
    tw = np.asarray(tw)
    rate, rate_med, rate_true = float(np.mean(tw > 0)), float(np.mean(med)), float(np.mean(np.concatenate(true)))
    print(f"\nW={w} d={d}, {tw.size} noise windows: P(spikes_tw>0) = {rate:.4f} (alpha {ALPHA}); "
          f"same margin with median σ²: {rate_med:.4f}; with the true σ²=1: {rate_true:.4f}; max count {tw.max():.0f}")
    assert abs(rate - ALPHA) <= 0.01
    assert tw.max() <= 2


@pytest.mark.parametrize("d, need", [(384, 0.99), (1024, 0.99), (256, 0.95)])
def test_spikes_tw_detects_planted_token_spike(d, need):
    """Population spike ℓ = 1.5·(1+√γ) (σ² = 1) along a random unit token
    direction u ⟂ 1 (so centring keeps it): columns ~ N(0, I + (ℓ−1)uuᵀ).

    At W=32, d=256 the 99% target is out of reach for any alpha = 1% test on
    λ1, even with the true σ²: the spike's eigenvalue ≈ N(2.26, 0.17²) and the
    TW 99% margin is 1.92, ~2 sd below. So 99% is asserted at d=384 (the
    MiniLM width watched in this project) and d=1024; at d=256 the power is
    reported and required to be within 2 points of the true-σ² oracle."""
    w, n_win = 32, 1_000
    gamma = (w - 1) / d
    ell = 1.5 * (1 + math.sqrt(gamma))
    rng = np.random.default_rng(4242 + d)
    unit = ref_tw_unit_margin(w - 1, d)
    found, oracle = [], []
    for _ in range(n_win // 500):
        z = rng.standard_normal((500, w, d))
        eigs, rows = centred_batch(plant_token_spike(z, random_token_directions(rng, 500, w), ell))
        found += [describe(e, w, d, row_sq_norms=r)[INDEX["spikes_tw"]] for e, r in zip(eigs, rows)]
        oracle.append(eigs[:, 0] > unit)
    found = np.asarray(found)
    power, power_oracle = float(np.mean(found >= 1)), float(np.mean(np.concatenate(oracle)))
    print(f"\nW={w} d={d} ell={ell:.3f} (BBP λ→{ell * (1 + gamma / (ell - 1)):.3f}, TW margin {unit:.3f}): "
          f"P(spikes_tw>=1) = {power:.4f} over {found.size}; true-σ² oracle {power_oracle:.4f}")
    assert power >= need
    assert power >= power_oracle - 0.02


def test_describe_throughput():
    rng = np.random.default_rng(9)
    eigs, rows = centred_batch(rng.standard_normal((200, 32, 256)))
    describe(eigs[0], 32, 256, row_sq_norms=rows[0])  # warm the caches (TW quantile, MP tables)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        for e, r in zip(eigs, rows):
            describe(e, 32, 256, row_sq_norms=r)
    per = (time.perf_counter() - t0) / (reps * len(eigs))
    t0 = time.perf_counter()
    for _ in range(reps):
        for e in eigs:
            describe(e, 32, 256)
    per_bare = (time.perf_counter() - t0) / (reps * len(eigs))
    print(f"\ndescribe(W=32, d=256): {per * 1e6:.1f} µs/call with row_sq_norms, {per_bare * 1e6:.1f} µs/call without "
          f"({1 / per:.0f} calls/s)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        describe(eigs[1], 32, 256)  # no warning on the normal path
