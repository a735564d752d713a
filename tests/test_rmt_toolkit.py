"""MP toolkit in kernels/rmt.py: noise estimators, BBP map, Tracy–Widom edge
margin, KL / W1 distances to MP.

Convention (module docstring): X is p×n, S = X Xᵀ/n, γ = p/n. Every numeric
check is against either the truth of a seeded simulation or an independent
float64 reference (tests/reference.py: scipy quadrature, a Fredholm determinant for
TW1, scipy.stats.wasserstein_distance), never against the module itself.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, stats

from eigenwatch.kernels import rmt

import reference

REPO = Path(__file__).resolve().parents[1]
GAMMAS = (0.05, 0.3, 1.0, 2.5)


# --------------------------------------------------------------------------- references and helpers


def spiked_eigs(rng, p: int, n: int, sigma2: float, spikes=()) -> np.ndarray:
    """Eigenvalues of S = X Xᵀ/n, columns of X ~ N(0, σ² diag(ℓ_1, …, ℓ_k, 1, …, 1))."""
    ell = np.ones(p)
    ell[: len(spikes)] = spikes
    x = np.sqrt(sigma2 * ell)[:, None] * rng.standard_normal((p, n))
    return np.linalg.eigvalsh(x @ x.T / n)


# --------------------------------------------------------------------------- import boundary


def test_rmt_imports_with_numpy_only():
    """The sidecar imports rmt without scipy/torch: block them (and tracywidom) and
    use everything but the TW margin, which must fail with an install hint."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('scipy', 'torch', 'TracyWidom', 'numdifftools'):
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from eigenwatch.kernels import rmt
        e = np.linspace(0.5, 1.5, 50)
        rmt.sigma2_mppca(e, 200); rmt.mppca(e, 200); rmt.sigma2_naive(e, 0.25)
        rmt.bbp_forward(3.0, 0.25); rmt.bbp_inverse(4.0, 0.25)
        rmt.kl_to_mp(e, 0.25); rmt.w1_to_mp(e, 0.25)
        try:
            rmt.tw_edge_margin(50, 200, 0.05)
        except ImportError as exc:
            assert 'tracywidom' in str(exc), exc
        else:
            raise AssertionError('tw_edge_margin worked without tracywidom')
        assert not any(m.split('.')[0] in ('scipy', 'torch') for m in sys.modules), 'heavy import'
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr


def test_tw_margin_missing_package_names_it(monkeypatch):
    rmt._tw1.cache_clear()
    monkeypatch.setitem(sys.modules, "TracyWidom", None)  # makes `import TracyWidom` raise ImportError
    try:
        with pytest.raises(ImportError, match="tracywidom"):
            rmt.tw_edge_margin(32, 128, 0.05)
    finally:
        rmt._tw1.cache_clear()


# --------------------------------------------------------------------------- noise estimators


@pytest.mark.parametrize("n_spikes", range(6))
def test_sigma2_estimators_with_planted_spikes(n_spikes):
    p, n, sigma2 = 512, 4096, 2.5
    gamma = p / n
    spikes = (6.0, 10.0, 15.0, 25.0, 40.0)[:n_spikes]  # all far above 1+√γ ≈ 1.35
    rng = np.random.default_rng(1000 + n_spikes)
    eigs = spiked_eigs(rng, p, n, sigma2, spikes)

    med = rmt.sigma2_median(eigs, gamma)  # p ≤ n: every eigenvalue is non-zero
    s2, k = rmt.mppca(eigs, n)
    naive = rmt.sigma2_naive(eigs, gamma)
    print(f"\nspikes={n_spikes}: median {med / sigma2 - 1:+.4f}, mppca {s2 / sigma2 - 1:+.4f} (k={k}), "
          f"naive {naive / sigma2 - 1:+.4f}")
    assert med == pytest.approx(sigma2, rel=0.02)
    assert s2 == pytest.approx(sigma2, rel=0.02)
    assert rmt.sigma2_mppca(eigs, n) == s2
    assert (s2, k) == pytest.approx(reference.mppca(eigs, n), rel=1e-12)
    assert n_spikes <= k <= n_spikes + 2  # TW fluctuations may add one noise eigenvalue
    assert naive == pytest.approx(float(eigs.max()) / (1 + math.sqrt(gamma)) ** 2, rel=1e-14)
    if n_spikes == 0:
        assert naive == pytest.approx(sigma2, rel=0.03)
    else:
        # λmax ≈ BBP image of the top spike, so naive ≈ ℓ(1+γ/(ℓ−1))σ²/(1+√γ)²
        assert abs(naive / sigma2 - 1) > 1.0
        assert naive == pytest.approx(reference.bbp(max(spikes), gamma, sigma2) / (1 + math.sqrt(gamma)) ** 2, rel=0.08)


def test_mppca_gamma_above_one_uses_non_zero_part():
    """p > n: S has p−n zero eigenvalues; MP-PCA works on the n non-zero ones."""
    p, n, sigma2 = 1200, 400, 0.7
    rng = np.random.default_rng(5)
    x = math.sqrt(sigma2) * rng.standard_normal((p, n))
    x[:2] *= np.sqrt([30.0, 12.0])[:, None]  # two population spikes, far above 1+√3
    gram = x.T @ x / n  # n×n, same non-zero spectrum as X Xᵀ/n
    nz = np.linalg.eigvalsh(gram)
    full = np.concatenate([np.zeros(p - n), nz])
    s2, k = rmt.mppca(full, n)
    assert s2 == pytest.approx(sigma2, rel=0.02)
    assert 2 <= k <= 4
    # same answer as the transposed problem XᵀX/p (an n×p noise matrix, γ' = n/p)
    s2_t, k_t = reference.mppca(nz * n / p, p)
    assert (s2, k) == pytest.approx((s2_t, k_t), rel=1e-12)
    # the median estimator, fed the non-zero eigenvalues, agrees
    assert rmt.sigma2_median(nz, p / n) == pytest.approx(sigma2, rel=0.03)


def test_mppca_edge_cases():
    assert rmt.mppca([3.0], 10) == (3.0, 0)
    assert rmt.mppca([2.0, 2.0, 2.0], 10) == (2.0, 0)
    # a huge outlier is peeled off before the flat rest is accepted
    s2, k = rmt.mppca([1000.0, 1.0, 1.0, 1.0], 100)
    assert (s2, k) == (1.0, 1)


# --------------------------------------------------------------------------- BBP


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("sigma2", [1.0, 3.2])
def test_bbp_forward_inverse_are_inverses(gamma, sigma2):
    thr = 1 + math.sqrt(gamma)
    ells = thr * np.array([1.0 + 1e-6, 1.01, 1.5, 2.0, 5.0, 40.0, 1e4])
    lam = rmt.bbp_forward(ells, gamma, sigma2)
    assert np.allclose(lam, [reference.bbp(e, gamma, sigma2) for e in ells], rtol=1e-14, atol=0)
    assert np.all(np.diff(lam) > 0) and np.all(lam > sigma2 * thr**2)
    back = rmt.bbp_inverse(lam, gamma, sigma2)
    assert np.allclose(back, ells, rtol=1e-9, atol=0)
    lams = sigma2 * thr**2 * np.array([1.0 + 1e-9, 1.001, 1.3, 3.0, 100.0])
    assert np.allclose(rmt.bbp_forward(rmt.bbp_inverse(lams, gamma, sigma2), gamma, sigma2), lams, rtol=1e-9)
    # scalars in, Python floats out
    assert isinstance(rmt.bbp_forward(float(ells[3]), gamma, sigma2), float)
    assert isinstance(rmt.bbp_inverse(float(lam[3]), gamma, sigma2), float)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_bbp_at_and_below_threshold_documented(gamma):
    sigma2 = 2.5
    thr = 1 + math.sqrt(gamma)
    edge = sigma2 * thr**2
    below = np.array([1e-3, 0.5, 1.0, thr * 0.999, thr])
    assert np.all(rmt.bbp_forward(below, gamma, sigma2) == edge)
    # continuity at the threshold
    assert rmt.bbp_forward(thr * (1 + 1e-9), gamma, sigma2) == pytest.approx(edge, rel=1e-8)
    # inverse at/below the edge (including 0): the threshold, never NaN
    lows = np.array([0.0, 0.1 * edge, 0.9 * edge, edge])
    inv = rmt.bbp_inverse(lows, gamma, sigma2)
    assert np.all(np.isfinite(inv)) and np.all(inv == thr)
    assert rmt.bbp_inverse(edge * (1 + 1e-12), gamma, sigma2) == pytest.approx(thr, rel=1e-5)
    # documented compositions
    ells = np.array([0.3, 1.0, thr, 2 * thr])
    assert np.allclose(rmt.bbp_inverse(rmt.bbp_forward(ells, gamma, sigma2), gamma, sigma2),
                       np.maximum(ells, thr), rtol=1e-9)


def test_bbp_forward_matches_simulated_top_eigenvalue():
    """Three separated spikes in one matrix: each leaves its own outlier at its BBP image."""
    p, n, sigma2 = 500, 4000, 2.5
    gamma = p / n
    ells = (10.0, 4.0, 2.0)  # threshold 1+√γ ≈ 1.354
    rng = np.random.default_rng(77)
    tops = np.mean([spiked_eigs(rng, p, n, sigma2, ells)[::-1][:3] for _ in range(3)], axis=0)
    for ell, top in zip(ells, tops):
        want = rmt.bbp_forward(ell, gamma, sigma2)
        print(f"\nell={ell}: simulated {top:.4f}, BBP {want:.4f}, population {ell * sigma2:.4f}")
        assert top == pytest.approx(want, rel=0.03)
        assert rmt.bbp_inverse(top, gamma, sigma2) == pytest.approx(ell, rel=0.04)
        if ell == 2.0:  # near threshold the BBP shift (+12.5%) is resolved: the map, not the identity
            assert abs(top - want) < 0.5 * abs(top - ell * sigma2)
    # a subthreshold spike leaves no outlier: λmax stays near the edge
    top = spiked_eigs(rng, p, n, sigma2, (1.2,))[-1]
    assert top == pytest.approx(rmt.bbp_forward(1.2, gamma, sigma2), rel=0.02)


def test_bbp_rejects_bad_input():
    with pytest.raises(ValueError, match="ell"):
        rmt.bbp_forward(np.nan, 0.5)
    with pytest.raises(ValueError, match="ell"):
        rmt.bbp_forward([2.0, np.inf], 0.5)
    with pytest.raises(ValueError, match="ell"):
        rmt.bbp_forward(0.0, 0.5)
    with pytest.raises(ValueError, match="lam"):
        rmt.bbp_inverse(np.nan, 0.5)
    with pytest.raises(ValueError, match="lam"):
        rmt.bbp_inverse(-1.0, 0.5)
    for fn in (rmt.bbp_forward, rmt.bbp_inverse):
        with pytest.raises(ValueError, match="gamma"):
            fn(3.0, 0.0)
        with pytest.raises(ValueError, match="sigma2"):
            fn(3.0, 0.5, sigma2=0.0)
        with pytest.raises(ValueError, match="sigma2"):
            fn(3.0, 0.5, sigma2=np.nan)


# --------------------------------------------------------------------------- Tracy–Widom margin


@pytest.mark.parametrize("q", [0.5, 0.95, 0.99])
def test_tw1_quantile_matches_fredholm_reference(q):
    # tracywidom interpolates a 1e-6 table linearly: ~4e-5 in probability, ~1e-4 in s
    s = rmt.tw1_quantile(q)
    assert reference.tw1_cdf(s) == pytest.approx(q, abs=1e-4)
    s_ref = reference.tw1_quantile(q)
    assert s == pytest.approx(s_ref, abs=2e-4)


def test_tw_edge_margin_matches_johnstone_formula():
    for p, n, alpha, sigma2 in ((32, 128, 0.05, 1.0), (200, 300, 0.01, 2.5), (300, 200, 0.1, 0.3)):
        assert rmt.tw_edge_margin(p, n, alpha, sigma2) == pytest.approx(reference.tw_margin(p, n, alpha, sigma2),
                                                                        rel=1e-6)


def test_tw_edge_margin_shape():
    # above the asymptotic edge, margin shrinking like n^(-2/3); decreasing in alpha; linear in σ²
    gamma = 0.25
    edge = rmt.mp_edges(gamma)[1]
    gaps = [rmt.tw_edge_margin(int(gamma * n), n, 0.05) - edge for n in (400, 3200, 25600)]
    assert all(g > 0 for g in gaps)
    assert gaps[0] / gaps[1] == pytest.approx(4.0, rel=0.15)
    assert gaps[1] / gaps[2] == pytest.approx(4.0, rel=0.15)
    m = [rmt.tw_edge_margin(64, 256, a) for a in (0.2, 0.05, 0.01, 0.001)]
    assert np.all(np.diff(m) > 0)
    assert rmt.tw_edge_margin(64, 256, 0.05, 3.0) == pytest.approx(3.0 * m[1], rel=1e-14)


def test_tw_edge_margin_false_alarm_rate_on_pure_noise():
    p, n, batches, per = 32, 128, 10, 500  # 5000 Gaussian 32×128 matrices
    rng = np.random.default_rng(2024)
    top = []
    for _ in range(batches):
        x = rng.standard_normal((per, p, n))
        top.append(np.linalg.eigvalsh(x @ x.transpose(0, 2, 1) / n)[:, -1])
    top = np.concatenate(top)
    rates = {a: float(np.mean(top > rmt.tw_edge_margin(p, n, a))) for a in (0.05, 0.01)}
    print(f"\np={p} n={n} trials={top.size}: P(λmax > margin) = {rates[0.05]:.4f} @ α=0.05, "
          f"{rates[0.01]:.4f} @ α=0.01 (MP edge alone: {np.mean(top > rmt.mp_edges(p / n)[1]):.3f})")
    assert abs(rates[0.05] - 0.05) <= 0.015
    assert abs(rates[0.01] - 0.01) <= 0.005
    # σ² scales through
    rate_scaled = float(np.mean(2.5 * top > rmt.tw_edge_margin(p, n, 0.05, sigma2=2.5)))
    assert rate_scaled == rates[0.05]


@pytest.mark.parametrize("kwargs, name", [
    (dict(p=32, n=128, alpha=0.0), "alpha"),
    (dict(p=32, n=128, alpha=1.0), "alpha"),
    (dict(p=32, n=128, alpha=-0.1), "alpha"),
    (dict(p=32, n=128, alpha=1.5), "alpha"),
    (dict(p=32, n=128, alpha=float("nan")), "alpha"),
    (dict(p=0, n=128, alpha=0.05), "p"),
    (dict(p=-3, n=128, alpha=0.05), "p"),
    (dict(p=2.5, n=128, alpha=0.05), "p"),
    (dict(p=32, n=0, alpha=0.05), "n"),
    (dict(p=32, n=1, alpha=0.05), "n"),
    (dict(p=32, n=128, alpha=0.05, sigma2=-1.0), "sigma2"),
])
def test_tw_edge_margin_rejects_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        rmt.tw_edge_margin(**kwargs)


# --------------------------------------------------------------------------- KL and W1


@pytest.fixture(scope="module")
def noise_1024():
    """A large pure-noise spectrum: p=1024, n=4096, σ²=2.5 (γ=0.25)."""
    rng = np.random.default_rng(99)
    return spiked_eigs(rng, 1024, 4096, 2.5), 0.25, 2.5


def test_kl_and_w1_small_for_noise_and_large_for_spikes_or_wrong_scale(noise_1024):
    eigs, gamma, sigma2 = noise_1024
    rng = np.random.default_rng(100)
    spiked = spiked_eigs(rng, 1024, 4096, sigma2, spikes=(5.0,) * 40)  # 4% of directions spiked
    kl0, w0 = rmt.kl_to_mp(eigs, gamma, sigma2), rmt.w1_to_mp(eigs, gamma, sigma2)
    cases = {
        "spiked": (spiked, sigma2),
        "sigma2 x1.15": (eigs, 1.15 * sigma2),
        "sigma2 x0.85": (eigs, 0.85 * sigma2),
    }
    bins = rmt._default_bins(eigs.size)
    print(f"\nnoise: KL {kl0:.5f} (chi2 bias (B-1)/2N = {(bins - 1) / (2 * eigs.size):.5f}), W1/σ² {w0 / sigma2:.5f}")
    assert kl0 < 0.02
    assert w0 < 0.01 * sigma2
    for label, (e, s2) in cases.items():
        kl, w = rmt.kl_to_mp(e, gamma, s2), rmt.w1_to_mp(e, gamma, s2)
        print(f"{label}: KL {kl:.5f}, W1/σ² {w / sigma2:.5f}")
        assert kl > 5 * kl0 and kl > 0.05, label
        assert w > 5 * w0, label


@pytest.mark.parametrize("gamma", GAMMAS)
def test_w1_matches_cdf_form_reference(gamma):
    rng = np.random.default_rng(int(gamma * 1000))
    sigma2 = 1.7
    lo, hi = rmt.mp_edges(gamma, sigma2)
    # inside and outside the bulk, with ties
    eigs = np.concatenate([rng.uniform(lo, hi, 300), [0.0, 0.5 * lo, hi * 1.3, hi * 3.0, hi * 3.0]])
    assert rmt.w1_to_mp(eigs, gamma, sigma2) == pytest.approx(reference.w1_mp(eigs, gamma, sigma2), rel=1e-6, abs=1e-9)


def test_w1_matches_scipy_wasserstein_on_mp_samples(noise_1024):
    eigs, gamma, sigma2 = noise_1024
    m = 400_000
    mp_sample = rmt.mp_quantile((np.arange(m) + 0.5) / m, gamma, sigma2)  # inverse-CDF sample
    want = stats.wasserstein_distance(eigs, mp_sample)
    assert rmt.w1_to_mp(eigs, gamma, sigma2) == pytest.approx(want, rel=1e-4)
    spiked = np.concatenate([eigs[:-3], [10.0, 20.0, 40.0]])
    assert rmt.w1_to_mp(spiked, gamma, sigma2) == pytest.approx(stats.wasserstein_distance(spiked, mp_sample),
                                                                rel=1e-4)


def test_w1_of_exact_quantiles_is_tiny_and_of_point_mass_is_mean_distance():
    gamma, sigma2 = 0.3, 2.0
    for size in (100, 1000):
        q = rmt.mp_quantile((np.arange(size) + 0.5) / size, gamma, sigma2)
        assert 0 <= rmt.w1_to_mp(q, gamma, sigma2) < 0.5 * (np.ptp(q) + 1) / size
    # a single point: W1 = E|X − c| under MP; c beyond the bulk gives |c − mean| = c − σ²
    lo, hi = rmt.mp_edges(gamma, sigma2)
    # (the module's tabulated quantile is exact to ~1e-8 relative)
    assert rmt.w1_to_mp([hi + 1.0], gamma, sigma2) == pytest.approx(hi + 1.0 - sigma2, rel=1e-7)
    assert rmt.w1_to_mp([0.0], gamma, sigma2) == pytest.approx(sigma2, rel=1e-7)  # MP mean is σ² (γ ≤ 1)
    # E|X − c| inside the bulk vs scipy quadrature of the textbook density
    c = 1.9

    def dens(x):
        return math.sqrt(max((hi - x) * (x - lo), 0.0)) / (2 * math.pi * sigma2 * gamma * x)
    want = integrate.quad(lambda x: abs(x - c) * dens(x), lo, hi, points=[c], limit=200, epsabs=1e-12)[0]
    assert rmt.w1_to_mp([c], gamma, sigma2) == pytest.approx(want, rel=1e-7)


def test_w1_and_kl_scaling_invariances(noise_1024):
    eigs, gamma, sigma2 = noise_1024
    w, kl = rmt.w1_to_mp(eigs, gamma, sigma2), rmt.kl_to_mp(eigs, gamma, sigma2)
    for c in (4.0, 0.37, 13.0):
        assert rmt.w1_to_mp(c * eigs, gamma, c * sigma2) == pytest.approx(c * w, rel=1e-9)
        assert rmt.kl_to_mp(c * eigs, gamma, c * sigma2) == pytest.approx(kl, rel=1e-9)
    # order does not matter
    perm = np.random.default_rng(3).permutation(eigs)
    assert rmt.w1_to_mp(perm, gamma, sigma2) == w
    assert rmt.kl_to_mp(perm, gamma, sigma2) == kl


@pytest.mark.parametrize("gamma", GAMMAS)
def test_kl_matches_reference_estimator(gamma):
    rng = np.random.default_rng(int(gamma * 100) + 1)
    sigma2 = 0.8
    lo, hi = rmt.mp_edges(gamma, sigma2)
    eigs = np.concatenate([rng.uniform(lo, hi, 500), [0.5 * lo, 2 * hi, 5 * hi]])
    for bins in (None, 7, 40):
        b = rmt._default_bins(eigs.size) if bins is None else bins
        got = rmt.kl_to_mp(eigs, gamma, sigma2, bins=bins)
        assert got == pytest.approx(reference.kl_mp(eigs, gamma, sigma2, b), rel=1e-9)
        assert got >= 0 and np.isfinite(got)


def test_kl_finite_for_degenerate_spectra():
    for e in ([5.0], [1.0] * 50, [1e6, 1e6, 2e6]):
        kl = rmt.kl_to_mp(e, 0.5, 1.0)
        assert np.isfinite(kl) and kl > 0


# --------------------------------------------------------------------------- bad input

EIG_FUNCS = {
    "sigma2_mppca": lambda e: rmt.sigma2_mppca(e, 100),
    "mppca": lambda e: rmt.mppca(e, 100),
    "sigma2_naive": lambda e: rmt.sigma2_naive(e, 0.5),
    "kl_to_mp": lambda e: rmt.kl_to_mp(e, 0.5, 1.0),
    "w1_to_mp": lambda e: rmt.w1_to_mp(e, 0.5, 1.0),
}
BAD_EIGS = {
    "nan": [1.0, np.nan, 2.0],
    "inf": [1.0, np.inf],
    "-inf": [-np.inf, 1.0],
    "empty": [],
    "2d": [[1.0, 2.0], [3.0, 4.0]],
}


@pytest.mark.parametrize("fn", EIG_FUNCS, ids=str)
@pytest.mark.parametrize("bad", BAD_EIGS, ids=str)
def test_bad_eigs_raise_naming_eigs(fn, bad):
    with pytest.raises(ValueError, match=r"^eigs:"):
        EIG_FUNCS[fn](BAD_EIGS[bad])


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("fn", [
    lambda g: rmt.sigma2_naive([1.0, 2.0], g),
    lambda g: rmt.kl_to_mp([1.0, 2.0], g),
    lambda g: rmt.w1_to_mp([1.0, 2.0], g),
    lambda g: rmt.bbp_forward(3.0, g),
    lambda g: rmt.bbp_inverse(3.0, g),
])
def test_bad_gamma_raises_naming_gamma(fn, gamma):
    with pytest.raises(ValueError, match=r"^gamma:"):
        fn(gamma)


@pytest.mark.parametrize("sigma2", [0.0, -2.0, float("nan"), float("inf")])
@pytest.mark.parametrize("fn", [
    lambda s: rmt.kl_to_mp([1.0, 2.0], 0.5, s),
    lambda s: rmt.w1_to_mp([1.0, 2.0], 0.5, s),
    lambda s: rmt.tw_edge_margin(10, 20, 0.05, s),
])
def test_bad_sigma2_raises_naming_sigma2(fn, sigma2):
    with pytest.raises(ValueError, match=r"^sigma2:"):
        fn(sigma2)


@pytest.mark.parametrize("n", [0, -5, 2.5, float("nan"), True])
def test_mppca_bad_n_raises_naming_n(n):
    with pytest.raises(ValueError, match=r"^n:"):
        rmt.mppca([1.0, 2.0], n)


@pytest.mark.parametrize("bins", [0, -1, 1.5])
def test_kl_bad_bins_raises_naming_bins(bins):
    with pytest.raises(ValueError, match=r"^bins:"):
        rmt.kl_to_mp([1.0, 2.0], 0.5, 1.0, bins=bins)


@pytest.mark.parametrize("q", [0.0, 1.0, -0.5, float("nan")])
def test_tw1_quantile_bad_q_raises_naming_q(q):
    with pytest.raises(ValueError, match=r"^q:"):
        rmt.tw1_quantile(q)
