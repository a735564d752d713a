"""Kernels: Marchenko–Pastur law (rmt), window spectra (the taps' path:
window_bank + gram), descriptors.

Every numeric check compares against an independent float64 numpy/scipy
reference (tests/reference.py), never against the module under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import integrate

from eigenwatch.kernels import rmt
from eigenwatch.kernels.descriptors import (
    DESCRIPTOR_DOCS,
    DESCRIPTOR_NAMES,
    INDEX,
    count_spikes,
    describe,
    mp_gamma,
)
from eigenwatch.kernels.gram import spectra
from eigenwatch.kernels.window_bank import WindowBank

import reference
from test_rmt_toolkit import spiked_eigs as planted_eigs
from reference import mp_cdf_quad as ref_cdf
from reference import mp_density as ref_density
from reference import mp_edges as ref_edges
from reference import mp_median as ref_median
from reference import window_eigenvalues as ref_window_eigs

GAMMAS = (0.05, 0.3, 1.0, 2.5)
PROPERTY = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def ref_describe(eigs: np.ndarray, window: int, dim: int) -> dict[str, float]:
    return reference.describe(eigs, window, dim)


def window_eigenvalues(x: torch.Tensor, decode: bool = False) -> np.ndarray:
    """The taps' path for one window: a WindowBank slot fed the rows (as one
    prefill chunk, or row by row as decode steps), then kernels/gram.py."""
    w, d = x.shape
    bank = WindowBank(w, d, max_slots=1, initial_slots=1)
    if decode:
        for row in x:
            bank.append([0], row[None])
    else:
        bank.extend(0, x, [])
    grams, valid = bank.window_gram([0])
    eigs, _, ok = spectra(grams, valid, 1.0 / d)
    assert bool(ok[0])
    return eigs[0].numpy()


# --------------------------------------------------------------------------- helpers


def assert_close_report(actual, expected, *, rtol: float, atol: float, label: str = "") -> None:
    """allclose that prints the first mismatches (index, actual, expected, |diff|, allowed)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{label}: shape {a.shape} != expected {e.shape}"
    allowed = atol + rtol * np.abs(e)
    bad = ~(np.abs(a - e) <= allowed)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        lines = [
            f"  [{','.join(map(str, i))}] got {a[tuple(i)]!r} want {e[tuple(i)]!r} "
            f"|diff|={abs(a[tuple(i)] - e[tuple(i)]):.3e} allowed={allowed[tuple(i)]:.3e}"
            for i in idx
        ]
        raise AssertionError(f"{label}: {int(bad.sum())}/{bad.size} mismatches, first:\n" + "\n".join(lines))


def assert_descriptors(got: np.ndarray, want: dict[str, float], *, rtol=1e-6, atol=1e-12, label="") -> None:
    assert got.shape == (len(DESCRIPTOR_NAMES),)
    bad = []
    for name in DESCRIPTOR_NAMES:
        g, w = float(got[INDEX[name]]), float(want[name])
        scaled = ("lambda1", "trace_mean", "sigma2", "mp_edge", "row_norm_mean")
        tol = atol * max(1.0, abs(want["lambda1"])) if name in scaled else atol
        if not abs(g - w) <= tol + rtol * abs(w):
            bad.append(f"  {name}: got {g!r} want {w!r}")
    assert not bad, f"{label}: descriptor mismatches:\n" + "\n".join(bad)


# --------------------------------------------------------------------------- rmt


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("sigma2", [1.0, 0.37])
def test_mp_edges_match_formula(gamma, sigma2):
    lo, hi = rmt.mp_edges(gamma, sigma2)
    rlo, rhi = ref_edges(gamma, sigma2)
    assert lo == pytest.approx(rlo, rel=1e-12, abs=1e-15)
    assert hi == pytest.approx(rhi, rel=1e-12)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("sigma2", [1.0, 2.5])
def test_mp_density_integrates_to_one_and_vanishes_outside(gamma, sigma2):
    lo, hi = rmt.mp_edges(gamma, sigma2)
    mass, err = integrate.quad(lambda x: float(rmt.mp_density(x, gamma, sigma2)), lo, hi, limit=200)
    assert mass == pytest.approx(1.0, abs=1e-6), f"gamma={gamma}: mass {mass} (quad err {err})"
    outside = np.array([lo - 1.0, lo * 0.5, lo, hi, hi * 1.0001, hi + 10.0, -1.0])
    assert np.all(rmt.mp_density(outside, gamma, sigma2) == 0.0)
    xs = np.linspace(lo, hi, 23)[1:-1]
    assert_close_report(
        rmt.mp_density(xs, gamma, sigma2), [ref_density(x, gamma, sigma2) for x in xs],
        rtol=1e-12, atol=0, label=f"density gamma={gamma}",
    )


@pytest.mark.parametrize("gamma", (*GAMMAS, 0.97, 10.0))
def test_mp_cdf_matches_quad_reference(gamma):
    sigma2 = 1.7
    lo, hi = ref_edges(gamma, sigma2)
    xs = np.concatenate([[lo - 1, lo], lo + (hi - lo) * np.linspace(0.001, 0.999, 37), [hi, hi + 1]])
    want = [ref_cdf(x, gamma, sigma2) for x in xs]
    assert_close_report(rmt.mp_cdf(xs, gamma, sigma2), want, rtol=0, atol=1e-4, label=f"cdf gamma={gamma}")
    assert np.all(np.diff(rmt.mp_cdf(xs, gamma, sigma2)) >= 0)


def test_mp_cdf_at_gamma_one_matches_closed_form():
    # γ = 1: λ− = 0 and the density diverges like x^(-1/2); x = 4 sin²φ gives
    # F(x) = (2φ + sin 2φ)/π exactly.
    xs = np.linspace(0.0, 4.0, 201)
    phi = np.arcsin(np.sqrt(xs / 4))
    want = (2 * phi + np.sin(2 * phi)) / np.pi
    assert_close_report(rmt.mp_cdf(xs, 1.0), want, rtol=0, atol=1e-5, label="cdf gamma=1")


@pytest.mark.parametrize("gamma", (*GAMMAS, 0.97))
def test_mp_quantile_matches_reference_and_inverts_cdf(gamma):
    sigma2 = 0.8
    qs = np.array([0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])
    x = rmt.mp_quantile(qs, gamma, sigma2)
    lo, hi = ref_edges(gamma, sigma2)
    assert x[0] == pytest.approx(lo, abs=1e-9) and x[-1] == pytest.approx(hi, rel=1e-9)
    assert np.all(np.diff(x) > 0)
    # the reference CDF at the module's quantiles gives back q
    assert_close_report([ref_cdf(v, gamma, sigma2) for v in x], qs, rtol=0, atol=1e-4, label=f"F(Q(q)) gamma={gamma}")
    assert float(rmt.mp_quantile(0.5, gamma)) == pytest.approx(ref_median(gamma), rel=1e-4)
    # the module's own pair are inverses
    assert_close_report(rmt.mp_cdf(x, gamma, sigma2), qs, rtol=0, atol=1e-9, label="cdf(quantile(q))")
    xs = lo + (hi - lo) * np.linspace(0.02, 0.98, 25)
    assert_close_report(rmt.mp_quantile(rmt.mp_cdf(xs, gamma, sigma2), gamma, sigma2), xs,
                        rtol=1e-7, atol=1e-9, label="quantile(cdf(x))")


@pytest.mark.parametrize("fn", [
    lambda g: rmt.mp_edges(g),
    lambda g: rmt.mp_density(1.0, g),
    lambda g: rmt.mp_cdf(1.0, g),
    lambda g: rmt.mp_quantile(0.5, g),
    lambda g: rmt.sigma2_median([1.0, 2.0], g),
], ids=["edges", "density", "cdf", "quantile", "sigma2_median"])
@pytest.mark.parametrize("gamma", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_gamma_raises_naming_gamma(fn, gamma):
    with pytest.raises(ValueError, match="gamma"):
        fn(gamma)


@pytest.mark.parametrize("q", [-0.01, 1.01, float("nan"), [0.2, 1.5], [0.5, float("nan")]])
def test_bad_quantile_raises_naming_q(q):
    with pytest.raises(ValueError, match=r"\bq\b"):
        rmt.mp_quantile(q, 0.5)


def test_sigma2_median_rejects_empty():
    with pytest.raises(ValueError, match="eigs"):
        rmt.sigma2_median([], 0.5)


@pytest.mark.parametrize("sigma2", [1.0, 3.2])
def test_sigma2_median_recovers_noise_level_and_beats_lambda_max(sigma2):
    rng = np.random.default_rng(20240601)
    p, n = 200, 800
    gamma = p / n
    naive = lambda e: float(np.max(e)) / (1 + math.sqrt(gamma)) ** 2  # noqa: E731

    noise = planted_eigs(rng, p, n, sigma2)
    assert rmt.sigma2_median(noise, gamma) == pytest.approx(sigma2, rel=0.03)
    assert naive(noise) == pytest.approx(sigma2, rel=0.05)  # fine without spikes

    spiked = planted_eigs(rng, p, n, sigma2, spikes=(25.0, 15.0, 10.0, 6.0))
    robust = rmt.sigma2_median(spiked, gamma)
    assert robust == pytest.approx(sigma2, rel=0.04)
    # λmax-based estimate is dragged up by the largest spike (≈ ℓ(1+γ/(ℓ−1))σ²/(1+√γ)²)
    assert naive(spiked) > 5 * sigma2
    assert abs(naive(spiked) / sigma2 - 1) > 20 * abs(robust / sigma2 - 1)


# --------------------------------------------------------------------------- window spectra

SHAPES = [(w, d) for w in (2, 3, 31, 64) for d in (1, 7, 100, 257)]
# The window Gram is float32 (as live): errors relative to the window's largest eigenvalue.
DTYPE_TOL = {torch.float64: 2e-5, torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
@pytest.mark.parametrize("w,d", SHAPES)
def test_window_spectra_match_numpy_reference(w, d, dtype, decode):
    rng = np.random.default_rng(1000 * w + d)
    # offset rows (a common mean the centring must remove) and an anisotropic spread
    data = rng.standard_normal((w, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(5.0, 2.0, size=d)
    t = torch.from_numpy(data).to(dtype)
    got = window_eigenvalues(t, decode)
    assert got.dtype == np.float64 and got.shape == (w,)
    assert np.all(got >= 0.0), got
    assert np.all(np.diff(got) <= 0.0), f"not descending: {got}"
    want = ref_window_eigs(data)  # unrounded data: dtype rounding and the fp32 Gram only
    scale = max(want[0], 1e-300)
    assert_close_report(got, want, rtol=0, atol=DTYPE_TOL[dtype] * scale, label=f"W={w} d={d} {dtype}")
    # rank: at most min(W-1, d) non-zero eigenvalues
    p = min(w - 1, d)
    assert np.all(got[p:] <= DTYPE_TOL[dtype] * scale), got[p:]


def test_window_spectra_do_not_touch_the_input():
    x = torch.randn(6, 9, requires_grad=True)
    before = x.detach().clone()
    window_eigenvalues(x.detach())
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_equal_rows_have_exactly_zero_spectrum(dtype, decode):
    # Rows are stored relative to the slot's first row, so equal rows are exact zeros.
    rng = np.random.default_rng(7)
    for w in (2, 3, 17, 64):
        row = torch.from_numpy(rng.standard_normal(33) * 10.0 ** rng.uniform(-4, 4)).to(dtype)
        e = window_eigenvalues(row.repeat(w, 1), decode)
        assert np.count_nonzero(e) == 0, f"W={w} {dtype}: {e[:3]}"
        desc = describe(e, w, 33)
        assert_descriptors(desc, ref_describe(np.zeros(w), w, 33), label="equal rows")


# --------------------------------------------------------------------------- describe


def test_descriptor_names_are_documented_and_indexed():
    assert DESCRIPTOR_NAMES == tuple(DESCRIPTOR_DOCS)
    assert len(set(DESCRIPTOR_NAMES)) == len(DESCRIPTOR_NAMES)
    assert all(DESCRIPTOR_NAMES[INDEX[n]] == n for n in DESCRIPTOR_NAMES)
    assert all(DESCRIPTOR_DOCS[n] for n in DESCRIPTOR_NAMES)


DESCRIBE_SHAPES = [(2, 1), (2, 50), (3, 1), (3, 9), (4, 300), (8, 16), (16, 15), (32, 256), (64, 64), (64, 7), (40, 2)]


@pytest.mark.parametrize("w,d", DESCRIBE_SHAPES)
@pytest.mark.parametrize("kind", ["noise", "spiked"])
def test_describe_matches_reference(w, d, kind):
    rng = np.random.default_rng(31 * w + d)
    x = rng.standard_normal((w, d))
    if kind == "spiked":
        x += 1.5 * np.outer(rng.standard_normal(w), rng.standard_normal(d))  # a rank-1 signal
    eigs = ref_window_eigs(x)
    got = describe(eigs, w, d)
    assert got.dtype == np.float64
    assert np.all(np.isfinite(got))
    want = ref_describe(ref_window_eigs(x), w, d)
    assert_descriptors(got, want, rtol=1e-6, atol=1e-9, label=f"W={w} d={d} {kind}")
    # order of the input eigenvalues does not matter
    assert np.array_equal(describe(rng.permutation(eigs), w, d), got)


def test_describe_hand_computed_spectrum():
    # W=5, d=10: p = 4 non-zero eigenvalues [4, 2, 1, 1] (+ the centring zero)
    eigs = np.array([1.0, 0.0, 4.0, 1.0, 2.0])
    got = describe(eigs, 5, 10)
    mean = 2.0
    prob = np.array([4, 2, 1, 1]) / 8
    h = -np.sum(prob * np.log(prob))
    expect = {
        "lambda1": 4.0, "lambda1_rel": 2.0, "lambda2_rel": 1.0, "lambda3_rel": 0.5, "gap12_rel": 1.0,
        "ratio12": 2.0, "spectral_entropy": h, "effective_rank": math.exp(h),
        "eig_variance_rel": np.var([4, 2, 1, 1]) / mean**2, "trace_mean": mean, "gamma": 0.4, "window": 5.0,
    }
    for name, v in expect.items():
        assert got[INDEX[name]] == pytest.approx(v, rel=1e-12), name
    s2 = 1.5 / ref_median(0.4)  # median of [4, 2, 1, 1]
    assert got[INDEX["sigma2"]] == pytest.approx(s2, rel=1e-5)
    assert got[INDEX["mp_edge"]] == pytest.approx(s2 * (1 + math.sqrt(0.4)) ** 2, rel=1e-5)
    assert got[INDEX["spikes"]] == float(np.sum(np.array([4, 2, 1, 1]) > s2 * (1 + math.sqrt(0.4)) ** 2))


@pytest.mark.parametrize("w,d", [(2, 3), (5, 10), (64, 7), (33, 32)])
def test_describe_zero_variance_window_is_documented_result(w, d):
    got = describe(np.zeros(w), w, d)
    assert np.all(np.isfinite(got))
    for name in DESCRIPTOR_NAMES:
        want = {"ratio12": 1.0, "gamma": (w - 1) / d, "window": float(w)}.get(name, 0.0)
        assert got[INDEX[name]] == want, f"{name}: {got[INDEX[name]]} != {want}"
    # tiny negative rounding noise of an all-zero Gram is accepted too
    assert np.array_equal(describe(np.r_[np.zeros(w - 1), -1e-40], w, d), got)


def test_describe_rank_deficient_window_ignores_rounding_noise():
    # rows take only 2 distinct values: rank 1 Gram, the other eigenvalues are
    # fp64 rounding noise and must not be counted as spectrum
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(40), rng.standard_normal(40)
    x = np.stack([a, b, a, a, b, b, a, b, a, a])
    descs = []
    for c in (1.0, 1e-3, 7.5, 1e3):
        for perm in (np.arange(10), rng.permutation(10), rng.permutation(10)):
            eigs = ref_window_eigs(c * x[perm])
            descs.append(describe(eigs, 10, 40))
    base = descs[0]
    assert base[INDEX["lambda2_rel"]] == 0.0 and base[INDEX["sigma2"]] == 0.0
    assert base[INDEX["spikes"]] == 1.0
    invariant = [n for n in DESCRIPTOR_NAMES if n not in ("lambda1", "trace_mean", "row_norm_mean")]
    for d in descs[1:]:
        for n in invariant:
            assert d[INDEX[n]] == pytest.approx(base[INDEX[n]], rel=1e-9, abs=1e-12), n


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_describe_rejects_non_finite(bad):
    eigs = np.array([3.0, 2.0, bad, 0.0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        describe(eigs, 4, 10)


@pytest.mark.parametrize("n", [3, 5, 0])
def test_describe_rejects_wrong_count(n):
    with pytest.raises(ValueError, match="expected 4 eigenvalues"):
        describe(np.ones(n), 4, 10)


def test_describe_rejects_bad_shapes_and_negative_spectra():
    with pytest.raises(ValueError, match="eigs"):
        describe(np.ones((2, 2)), 4, 10)
    with pytest.raises(ValueError, match="non-negative"):
        describe(np.array([1.0, 0.5, -0.1, 0.0]), 4, 10)
    with pytest.raises(ValueError, match="window"):
        describe(np.ones(1), 1, 10)
    with pytest.raises(ValueError, match="dim"):
        describe(np.ones(4), 4, 0)


def test_mp_gamma():
    assert mp_gamma(32, 256) == 31 / 256
    assert mp_gamma(2, 1) == 1.0
    with pytest.raises(ValueError, match="window"):
        mp_gamma(1, 8)
    with pytest.raises(ValueError, match="dim"):
        mp_gamma(8, 0)


@pytest.mark.parametrize("w,d", [(64, 7), (64, 16), (10, 1), (33, 8)])
def test_describe_gamma_above_one(w, d):
    rng = np.random.default_rng(w * d)
    x = rng.standard_normal((w, d)) * 2.0
    eigs = ref_window_eigs(x.astype(np.float32))
    got = describe(eigs, w, d)
    assert got[INDEX["gamma"]] == pytest.approx((w - 1) / d) and got[INDEX["gamma"]] > 1
    assert np.all(np.isfinite(got)), dict(zip(DESCRIPTOR_NAMES, got))
    assert got[INDEX["sigma2"]] > 0 and got[INDEX["trace_mean"]] > 0
    want = ref_describe(ref_window_eigs(x.astype(np.float32)), w, d)
    assert_descriptors(got, want, rtol=1e-6, atol=1e-9, label=f"gamma>1 W={w} d={d}")
    # only d eigenvalues carry the spectrum: the mean is over d, not W-1
    assert got[INDEX["trace_mean"]] == pytest.approx(np.sum(eigs) / d, rel=1e-9)


def test_count_spikes_against_reference_edge():
    eigs = np.array([10.0, 3.0, 2.0, 1.0, 0.5, 0.0])  # W=6
    w, d = 6, 20
    gamma = 5 / 20
    for sigma2 in (0.5, 1.0, 2.0, 8.0):
        edge = sigma2 * (1 + math.sqrt(gamma)) ** 2
        assert count_spikes(eigs, w, d, sigma2) == int(np.sum(eigs > edge))


# --------------------------------------------------------------------------- properties

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def raw_windows(draw):
    w = draw(st.integers(2, 12))
    d = draw(st.integers(1, 12))
    return draw(hnp.arrays(np.float32, (w, d), elements=finite))


@st.composite
def gaussian_windows(draw):
    """Generic (full-rank) windows: shape, seed, offsets and per-row scales drawn."""
    w = draw(st.integers(2, 40))
    d = draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    row_scale = rng.uniform(0.2, 5.0, size=(w, 1)) if draw(st.booleans()) else 1.0
    offset = rng.standard_normal(d) * draw(st.sampled_from([0.0, 1.0, 100.0]))
    return rng.standard_normal((w, d)) * row_scale + offset


@PROPERTY
@given(raw_windows())
def test_property_any_finite_window_has_valid_spectrum(x):
    e = window_eigenvalues(torch.from_numpy(x))  # the taps' path (float32 window Gram)
    assert e.shape == (x.shape[0],)
    assert np.all(e >= 0.0) and np.all(np.diff(e) <= 0.0)
    ref = ref_window_eigs(x)
    assert_close_report(e, ref, rtol=0, atol=2e-5 * max(ref[0], 1e-300), label="raw window")
    desc = describe(e, *x.shape)
    assert np.all(np.isfinite(desc)), dict(zip(DESCRIPTOR_NAMES, desc))


@PROPERTY
@given(gaussian_windows(), st.randoms(use_true_random=False))
def test_property_descriptors_invariant_to_token_order(x, rnd):
    perm = list(range(x.shape[0]))
    rnd.shuffle(perm)
    e1 = ref_window_eigs(x)
    e2 = ref_window_eigs(x[perm])
    assert_close_report(e2, e1, rtol=1e-9, atol=1e-12 * e1[0], label="permuted eigs")
    d1, d2 = describe(e1, *x.shape), describe(e2, *x.shape)
    assert d1[INDEX["spikes"]] == d2[INDEX["spikes"]]
    assert_close_report(d2, d1, rtol=1e-7, atol=1e-12, label="permuted descriptors")


SCALE_FREE = ("lambda1_rel", "lambda2_rel", "lambda3_rel", "gap12_rel", "ratio12", "spectral_entropy",
              "effective_rank", "eig_variance_rel", "spikes", "gamma", "window",
              "gap23_rel", "spikes_tw", "kl_mp", "w1_mp", "sigma2_mppca_rel", "l12_proxy", "nuclear_rel")
SCALE_SQUARED = ("lambda1", "trace_mean", "sigma2", "mp_edge")
SCALE_LINEAR = ("row_norm_mean",)


def test_scale_lists_cover_every_descriptor():
    assert sorted(SCALE_FREE + SCALE_SQUARED + SCALE_LINEAR) == sorted(DESCRIPTOR_NAMES)


@PROPERTY
@given(gaussian_windows(), st.floats(1e-3, 1e3))
def test_property_scaling_window(x, c):
    e1 = ref_window_eigs(x)
    e2 = ref_window_eigs(c * x)
    assert_close_report(e2, c * c * e1, rtol=1e-8, atol=1e-12 * c * c * e1[0], label=f"eigs scaled by {c}")
    d1, d2 = describe(e1, *x.shape), describe(e2, *x.shape)
    for name in SCALE_FREE:
        assert d2[INDEX[name]] == pytest.approx(d1[INDEX[name]], rel=1e-7, abs=1e-12), name
    for name in SCALE_SQUARED:
        assert d2[INDEX[name]] == pytest.approx(c * c * d1[INDEX[name]], rel=1e-7), name
    for name in SCALE_LINEAR:
        assert d2[INDEX[name]] == pytest.approx(c * d1[INDEX[name]], rel=1e-7), name


# --------------------------------------------------------------------------- spike detection


def test_spike_count_false_alarms_and_bbp_detection():
    """Pure-noise windows vs a planted population spike above the BBP threshold.

    The window's Gram is a (W−1)-dimensional covariance seen through n = d
    samples (its columns), so a population spike ℓ is planted on the token
    side: columns get covariance I + (ℓ−1)uuᵀ with u ⟂ 1 (survives centring).
    It separates from the bulk iff ℓ > 1 + √γ. The same spike on the feature
    side (rows with covariance I + (ℓ−1)vvᵀ) separates iff ℓ > 1 + 1/√γ.
    """
    w, d, trials = 32, 256, 300
    gamma = (w - 1) / d
    rng = np.random.default_rng(12345)
    u = np.where(np.arange(w) % 2 == 0, 1.0, -1.0) / math.sqrt(w)
    v = rng.standard_normal(d)
    v /= np.linalg.norm(v)
    ell_tok = 3 * (1 + math.sqrt(gamma))
    ell_feat = 3 * (1 + 1 / math.sqrt(gamma))

    def spikes(x):
        e = ref_window_eigs(x.astype(np.float32))
        return describe(e, w, d)[INDEX["spikes"]]

    noise, tok, feat = [], [], []
    for _ in range(trials):
        z = rng.standard_normal((w, d))
        noise.append(spikes(z))
        tok.append(spikes(z + (math.sqrt(ell_tok) - 1) * np.outer(u, u @ z)))
        feat.append(spikes(z + (math.sqrt(ell_feat) - 1) * np.outer(z @ v, v)))
    noise, tok, feat = map(np.asarray, (noise, tok, feat))
    print(f"\nW={w} d={d} gamma={gamma:.3f}: noise windows with spikes>0: {np.mean(noise > 0):.3f} "
          f"(mean {noise.mean():.3f}); token spike detected {np.mean(tok >= 1):.3f}; "
          f"feature spike detected {np.mean(feat >= 1):.3f}")
    assert np.mean(tok >= 1) >= 0.95
    assert np.mean(feat >= 1) >= 0.95
    # sane false alarms: most pure-noise windows report no spike, none report many
    assert np.mean(noise > 0) < 0.5
    assert noise.max() <= 3
    assert np.mean(tok >= 1) - np.mean(noise > 0) > 0.4


def test_describe_batch_equals_describe_window_by_window():
    """The taps describe every window of a step in one call: each row equals
    describe() of that window alone, degenerate rows included, and an unusable
    row costs only itself."""
    from eigenwatch.kernels.descriptors import describe_batch

    rng = np.random.default_rng(17)
    w, d = 16, 40
    rows, norms = [], []
    for kind in ("noise", "spiked", "equal", "rank1", "noise", "nan", "negative", "bad_norms"):
        x = rng.standard_normal((w, d))
        if kind == "spiked":
            x += 2.0 * np.outer(rng.standard_normal(w), rng.standard_normal(d))
        elif kind == "equal":
            x = np.tile(x[:1], (w, 1))
        elif kind == "rank1":
            x = np.outer(rng.standard_normal(w), rng.standard_normal(d))
        e, r = reference.window_spectrum(x)
        if kind == "nan":
            e[3] = np.nan
        elif kind == "negative":
            e[-1] = -0.5 * e[0]
        elif kind == "bad_norms":
            r = 2.0 * r
        rows.append(e)
        norms.append(r)
    got, problems = describe_batch(np.stack(rows), w, d, row_sq_norms=np.stack(norms))
    for f, (e, r) in enumerate(zip(rows, norms)):
        try:
            want = describe(e, w, d, row_sq_norms=r)
        except ValueError as exc:
            assert problems[f] == str(exc) and np.isnan(got[f]).all()
            continue
        assert problems[f] is None
        np.testing.assert_array_equal(got[f], want)
    assert [p is not None for p in problems] == [False] * 5 + [True] * 3
    no_rows, _ = describe_batch(np.stack(rows[:5]), w, d)
    for f in range(5):
        np.testing.assert_array_equal(no_rows[f], describe(rows[f], w, d))
