"""Marchenko–Pastur (MP) law for sample-covariance spectra (numpy, float64).

Convention: X is p×n with i.i.d. entries of variance σ²; S = X Xᵀ / n has
eigenvalues that, for p, n → ∞ with γ = p/n, follow MP(γ, σ²) with bulk on
[σ²(1−√γ)², σ²(1+√γ)²]. For γ > 1, S has p−n zero eigenvalues and the law
has a point mass 1−1/γ at 0; the functions below describe the continuous
(non-zero) part, normalised to mass 1.

A window of W token rows of width d, centred over tokens, is p = W−1, n = d.

Toolkit (same convention, float64): noise level σ² by the MP median
(`sigma2_median`), MP-PCA (`sigma2_mppca`, `mppca`) or λ_max (`sigma2_naive`,
for comparison only); the BBP spike map (`bbp_forward`, `bbp_inverse`); a
finite-(p, n) Tracy–Widom margin above the upper edge (`tw_edge_margin`, needs
the `tracywidom` package at call time); distances from a spectrum to MP
(`kl_to_mp`, `w1_to_mp`). Importing this module needs numpy only.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not np.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma: must be a finite ratio p/n > 0, got {gamma!r}")
    return gamma


def mp_edges(gamma: float, sigma2: float = 1.0) -> tuple[float, float]:
    """Bulk edges (λ−, λ+) of MP(γ, σ²)."""
    gamma = _check_gamma(gamma)
    s = np.sqrt(gamma)
    return sigma2 * (1.0 - s) ** 2, sigma2 * (1.0 + s) ** 2


def mp_density(x, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """Density of the non-zero part of MP(γ, σ²), integrating to 1 on the bulk."""
    gamma = _check_gamma(gamma)
    x = np.asarray(x, dtype=np.float64)
    lo, hi = mp_edges(gamma, sigma2)
    inside = (x > lo) & (x < hi)
    xs = np.where(inside, x, 1.0)
    dens = np.sqrt(np.clip((hi - xs) * (xs - lo), 0.0, None)) / (2.0 * np.pi * sigma2 * gamma * xs)
    # For γ > 1 the continuous part has mass 1/γ; renormalise it to 1.
    dens = dens * max(gamma, 1.0)
    return np.where(inside, dens, 0.0)


@lru_cache(maxsize=256)
def _unit_cdf_table(gamma: float, n: int = 4097) -> tuple[np.ndarray, np.ndarray]:
    # Nodes x = lo + (hi−lo)·sin²(θ/2) on a uniform θ grid (Chebyshev-spaced):
    # they cluster at both square-root edges, where the density bends.
    lo, hi = mp_edges(gamma, 1.0)
    theta = np.linspace(0.0, np.pi, n)
    t = 0.5 - 0.5 * np.cos(theta)
    x = lo + (hi - lo) * t
    # Integrate in θ (dx = (hi−lo)/2·sinθ dθ, midpoint rule): the integrand is
    # smooth there even at γ ≈ 1, where the density itself diverges like x^(-1/2)
    # at λ− = 0 and a trapezoid in x (f(λ−) = 0) loses ~2e-4 of mass.
    mid = 0.5 * (theta[1:] + theta[:-1])
    g = mp_density(lo + (hi - lo) * (0.5 - 0.5 * np.cos(mid)), gamma, 1.0) * (0.5 * (hi - lo) * np.sin(mid))
    cdf = np.concatenate([[0.0], np.cumsum(g) * (theta[1] - theta[0])])
    cdf /= cdf[-1]
    return x, cdf


def mp_cdf(x, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """CDF of the non-zero part of MP(γ, σ²)."""
    gamma = _check_gamma(gamma)
    grid, cdf = _unit_cdf_table(round(gamma, 12))
    return np.interp(np.asarray(x, dtype=np.float64) / sigma2, grid, cdf, left=0.0, right=1.0)


def mp_quantile(q, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """Quantile function of the non-zero part of MP(γ, σ²)."""
    gamma = _check_gamma(gamma)
    q = np.asarray(q, dtype=np.float64)
    if not np.all((q >= 0) & (q <= 1)):  # also rejects NaN
        raise ValueError(f"q: quantiles must lie in [0, 1], got {q!r}")
    grid, cdf = _unit_cdf_table(round(gamma, 12))
    return sigma2 * np.interp(q, cdf, grid)


def sigma2_median(eigs, gamma: float) -> float:
    """Robust σ²: median non-zero eigenvalue over the MP median (Gavish–Donoho
    style). A few spikes move the median by a rank or two, not by their size."""
    eigs = np.asarray(eigs, dtype=np.float64)
    if eigs.size == 0:
        raise ValueError("eigs: need at least one eigenvalue to estimate sigma2")
    return float(np.median(eigs) / mp_quantile(0.5, gamma))


# --------------------------------------------------------------------------- toolkit
#
# Noise-level estimators, the BBP spike map, a finite-(p, n) Tracy–Widom edge
# margin and distances between an empirical spectrum and MP. Same convention as
# above: X is p×n (p variables, n samples) with i.i.d. entries of variance σ²,
# S = X Xᵀ / n, γ = p/n, bulk [σ²(1−√γ)², σ²(1+√γ)²]. All float64.
#
# numpy only at import time: `tw_edge_margin` imports the `tracywidom` package
# (which needs scipy) lazily, inside the call.


def _check_eigs(eigs, name: str = "eigs") -> np.ndarray:
    arr = np.asarray(eigs, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of eigenvalues, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: need at least one eigenvalue, got an empty array")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or Inf")
    return arr


def _check_sigma2(sigma2: float) -> float:
    try:
        sigma2 = float(sigma2)
    except (TypeError, ValueError):
        raise ValueError(f"sigma2: must be a finite number > 0, got {sigma2!r}") from None
    if not np.isfinite(sigma2) or sigma2 <= 0:
        raise ValueError(f"sigma2: must be a finite number > 0, got {sigma2!r}")
    return sigma2


def _check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if not (isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def sigma2_naive(eigs, gamma: float) -> float:
    """Naive σ²: λ_max / (1+√γ)², i.e. "the top eigenvalue is the bulk edge".

    Only for comparison. Fine for pure noise (up to the O(n^(-2/3)) Tracy–Widom
    fluctuation of λ_max), but any spike above the BBP threshold sits outside
    the bulk and drags it upward: a population spike ℓσ² gives
    ≈ σ²·ℓ(1+γ/(ℓ−1))/(1+√γ)², unbounded in ℓ. Prefer `sigma2_median` or
    `sigma2_mppca`.
    """
    gamma = _check_gamma(gamma)
    eigs = _check_eigs(eigs)
    return float(np.max(eigs) / (1.0 + np.sqrt(gamma)) ** 2)


def mppca(eigs, n: int) -> tuple[float, int]:
    """MP-PCA (Veraart et al., NeuroImage 2016): noise level σ² and signal rank k.

    eigs: all p eigenvalues of S = X Xᵀ / n for a p×n matrix X (any order; p is
    len(eigs)); n: the number of samples (columns of X).

    With λ_1 ≥ … ≥ λ_m the non-zero eigenvalues (m = min(p, n); for p > n the
    p−n smallest, structurally zero, are dropped), k is the smallest number of
    signal components such that the other m−k are consistent with MP:

        σ²_k = mean(λ_{k+1}, …, λ_m),   (λ_{k+1} − λ_m) ≤ 4·√γ_k·σ²_k,
        γ_k = (m−k)/N  with N = max(p, n),

    i.e. the spread of the remaining eigenvalues is no wider than the MP bulk
    4σ²√γ_k of a (p−k)×n noise matrix (for p ≤ n this is exactly Veraart's
    γ_k = (p−k)/n). For p > n the criterion is applied to XᵀX/p, whose
    eigenvalues are λ·n/p and whose MP ratio is n/p; its σ² is the same.
    k = m−1 always passes (a single eigenvalue has zero spread), so a result
    always exists. Returns (σ², k) with σ² = σ²_k (times n/p when p > n).
    Negative rounding noise in eigs is kept as is.
    """
    eigs = _check_eigs(eigs)
    n = _check_count(n, "n")
    sig, k = mppca_batch(eigs[None, :], n)
    return float(sig[0]), int(k[0])


def mppca_batch(eigs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`mppca` for F spectra of the same size at once: eigs [F, p] -> (σ² [F], k [F])."""
    eigs = np.asarray(eigs, dtype=np.float64)
    p = eigs.shape[1]
    m, big = min(p, n), max(p, n)
    lam = -np.sort(-eigs, axis=1)[:, :m] * (n / big)  # [F, m] eigenvalues of the m×m-side Gram / N
    r = np.arange(m, 0, -1, dtype=np.float64)  # remaining count m−k for k = 0..m−1
    tail_sum = np.cumsum(lam[:, ::-1], axis=1)[:, ::-1]  # Σ_{i>k} λ_i
    sig = tail_sum / r
    spread = lam - lam[:, -1:]  # λ_{k+1} − λ_m
    ok = spread <= 4.0 * np.sqrt(r / big) * sig
    k = np.argmax(ok, axis=1)  # ok[m−1] is always True (spread 0, unless σ² < 0)
    rows = np.arange(len(lam))
    k = np.where(ok[rows, k], k, m - 1)
    return sig[rows, k], k


def sigma2_mppca(eigs, n: int) -> float:
    """σ² from MP-PCA (Veraart et al. 2016); see `mppca` for the criterion and
    for the number of signal components k that goes with it."""
    return mppca(eigs, n)[0]


def _check_finite_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or Inf")
    return arr


def bbp_forward(ell, gamma: float, sigma2: float = 1.0):
    """BBP map: population spike ℓ (in units of σ²) → its top sample eigenvalue.

    For a population covariance σ²(I + (ℓ−1)uuᵀ) of the p variables and
    ℓ > 1 + √γ (the BBP threshold), the matching eigenvalue of S converges to
    σ²·ℓ(1 + γ/(ℓ−1)) (Baik–Ben Arous–Péché 2005, Baik–Silverstein, Paul 2007).
    At or below the threshold the spike is absorbed and the eigenvalue sticks
    to the bulk edge σ²(1+√γ)²; the map is continuous there.
    ell: > 0 (a variance ratio), scalar or array; returns the same shape (a
    Python float for a scalar), in absolute units (times σ²).
    """
    gamma = _check_gamma(gamma)
    sigma2 = _check_sigma2(sigma2)
    ell_a = _check_finite_array(ell, "ell")
    if np.any(ell_a <= 0):
        raise ValueError(f"ell: a population variance ratio must be > 0, got {ell!r}")
    thr = 1.0 + np.sqrt(gamma)
    above = ell_a > thr
    safe = np.where(above, ell_a, 2.0 * thr)
    out = np.where(above, safe * (1.0 + gamma / (safe - 1.0)), thr * thr) * sigma2
    return float(out) if out.ndim == 0 else out


def bbp_inverse(lam, gamma: float, sigma2: float = 1.0):
    """Inverse BBP map: a sample eigenvalue λ (absolute units) → the population
    spike ℓ (in units of σ²) that puts its top eigenvalue there.

    With x = λ/σ² > (1+√γ)², ℓ is the larger root of ℓ² − (1+x−γ)ℓ + x = 0:
    ℓ = [(1+x−γ) + √((1+x−γ)² − 4x)]/2, which is > 1+√γ.
    Documented behaviour at/below the edge (x ≤ (1+√γ)², including 0): returns
    the BBP threshold 1+√γ — the largest spike that leaves no outlier — never
    NaN. Hence bbp_inverse(bbp_forward(ℓ)) = max(ℓ, 1+√γ) and
    bbp_forward(bbp_inverse(λ)) = max(λ, σ²(1+√γ)²).
    lam: ≥ 0, scalar or array (a Python float for a scalar). Negative, NaN or
    Inf values raise ValueError.
    """
    gamma = _check_gamma(gamma)
    sigma2 = _check_sigma2(sigma2)
    lam_a = _check_finite_array(lam, "lam")
    if np.any(lam_a < 0):
        raise ValueError(f"lam: a sample-covariance eigenvalue must be >= 0, got {lam!r}")
    thr = 1.0 + np.sqrt(gamma)
    x = lam_a / sigma2
    b = 1.0 + x - gamma
    # (1+x−γ)² − 4x = (x − λ−)(x − λ+) in units of σ²: factored, it is exactly 0 at the edge.
    disc = (x - (1.0 - np.sqrt(gamma)) ** 2) * (x - thr * thr)
    above = x > thr * thr
    root = 0.5 * (b + np.sqrt(np.where(above, disc, 0.0)))
    out = np.where(above, np.maximum(root, thr), thr)
    return float(out) if out.ndim == 0 else out


@lru_cache(maxsize=1)
def _tw1():
    try:
        from TracyWidom import TracyWidom  # the `tracywidom` PyPI package (needs scipy)
    except ImportError as exc:
        raise ImportError(
            "tw_edge_margin needs the Tracy–Widom quantiles of the 'tracywidom' package "
            "(module TracyWidom, which also needs scipy): pip install tracywidom==0.4.0"
        ) from exc
    return TracyWidom(beta=1)


def tw1_quantile(q: float) -> float:
    """Quantile of the Tracy–Widom β=1 law (real data), from `tracywidom`."""
    q = float(q)
    if not (0.0 < q < 1.0):
        raise ValueError(f"q: a quantile level must lie in (0, 1), got {q!r}")
    return float(_tw1().cdfinv(q))


def tw_edge_margin(p: int, n: int, alpha: float, sigma2: float = 1.0) -> float:
    """Threshold λ with P(λ_max(S) > λ) ≈ alpha for pure real Gaussian noise.

    S = X Xᵀ/n, X p×n with i.i.d. N(0, σ²) entries (not centred). Johnstone
    (2001, Ann. Statist. 29:295) for the unnormalised largest eigenvalue l_1 of
    X Xᵀ: (l_1 − μ_np)/σ_np → TW1 with

        μ_np = (√(n−1) + √p)²,
        σ_np = (√(n−1) + √p)·(1/√(n−1) + 1/√p)^(1/3),

    so with the 1/n of S: λ = σ²·(μ_np + σ_np·TW1⁻¹(1−alpha))/n, which tends to
    the MP edge σ²(1+√γ)² plus an O(n^(-2/3)) margin. Needs n ≥ 2 (the n−1).
    TW1⁻¹ comes from the `tracywidom` package, imported here (ImportError
    naming it if missing).
    """
    p = _check_count(p, "p")
    n = _check_count(n, "n", minimum=2)
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha: must lie in (0, 1), got {alpha!r}") from None
    if not (0.0 < alpha < 1.0):  # also rejects NaN
        raise ValueError(f"alpha: must lie in (0, 1), got {alpha!r}")
    sigma2 = _check_sigma2(sigma2)
    s = np.sqrt(n - 1.0) + np.sqrt(p)
    mu = s * s
    sd = s * (1.0 / np.sqrt(n - 1.0) + 1.0 / np.sqrt(p)) ** (1.0 / 3.0)
    return float(sigma2 * (mu + sd * tw1_quantile(1.0 - alpha)) / n)


def _default_bins(size: int) -> int:
    return int(max(4, min(200, round(2.0 * size ** (1.0 / 3.0)))))  # Rice rule


def kl_to_mp(eigs, gamma: float, sigma2: float = 1.0, bins: int | None = None) -> float:
    """KL(empirical ‖ MP) in nats, on a common binning of the bulk.

    Binning: B bins of equal MP(γ, σ²) mass 1/B that tile the bulk (edges at
    mp_quantile(j/B)), plus two tail bins below λ− and above λ+ where MP has
    mass 0, so outliers (spikes) and a wrong scale are seen. B defaults to the
    Rice rule 2·N^(1/3) (4…200) for N = len(eigs).
    Smoothing, so the value is finite: both histograms get a Krichevsky–Trofimov
    pseudo-count ½ per bin as if the model also had N samples:
        p̂_i = (c_i + ½)/(N + (B+2)/2),   q̂_i = (N·q_i + ½)/(N + (B+2)/2),
    KL = Σ p̂_i log(p̂_i/q̂_i) ≥ 0, and 0 iff the counts are exactly N/B per bulk
    bin with none outside. For N i.i.d. draws from MP its expectation is about
    the χ² bias (B−1)/(2N); real noise spectra are rigid (eigenvalue
    repulsion) and land well below that. Invariant to scaling eigs and σ²
    together. eigs: the spectrum to compare with the continuous part (for
    γ > 1 the non-zero eigenvalues only).
    """
    gamma = _check_gamma(gamma)
    sigma2 = _check_sigma2(sigma2)
    eigs = _check_eigs(eigs)
    if bins is not None:
        bins = _check_count(bins, "bins")
    return float(kl_to_mp_batch(eigs[None, :], gamma, np.array([sigma2]), bins)[0])


def kl_to_mp_batch(eigs: np.ndarray, gamma: float, sigma2: np.ndarray, bins: int | None = None) -> np.ndarray:
    """`kl_to_mp` for F spectra of the same size at once: eigs [F, N], sigma2 [F] -> [F]."""
    eigs = np.asarray(eigs, dtype=np.float64)
    f, size = eigs.shape
    if bins is None:
        bins = _default_bins(size)
    lo, hi = mp_edges(gamma, 1.0)
    unit = np.concatenate([[lo], mp_quantile(np.arange(1, bins) / bins, gamma), [hi]])  # [B+1]
    edges = np.asarray(sigma2, dtype=np.float64)[:, None] * unit[None, :]  # [F, B+1], as mp_quantile(., σ²) does
    # bin 0: x < λ−; bins 1..B: the bulk (left-closed); bin B+1: x ≥ λ+ (searchsorted "right").
    idx = (edges[:, None, :] <= eigs[:, :, None]).sum(axis=2)  # [F, N]
    counts = np.zeros((f, bins + 2))
    np.add.at(counts, (np.repeat(np.arange(f), size), idx.ravel()), 1.0)
    model = np.concatenate([[0.0], np.full(bins, 1.0 / bins), [0.0]])
    denom = size + 0.5 * (bins + 2)
    p_hat = (counts + 0.5) / denom
    q_hat = (size * model + 0.5) / denom
    return np.maximum(np.sum(p_hat * np.log(p_hat / q_hat), axis=1), 0.0)


def w1_to_mp(eigs, gamma: float, sigma2: float = 1.0) -> float:
    """Wasserstein-1 distance between the empirical spectral law of eigs and
    MP(γ, σ²), W1 = ∫₀¹ |F⁻¹_emp(q) − F⁻¹_MP(q)| dq, in the units of eigs.

    Exact (to rounding) for the MP quantile function as the module tabulates it
    (`mp_quantile`: piecewise linear in q on 4097 Chebyshev-spaced nodes; the
    table's error against the exact law is ~1e-8 relative): with the sorted
    eigenvalues x_(i) on q ∈ ((i−1)/N, i/N], each piece is integrated in
    closed form, splitting at the crossing q* = mp_cdf(x_(i)) and using the
    exact integral G(q) = ∫₀^q F⁻¹_MP of the piecewise-linear quantile.
    Scales linearly: w1(c·eigs, γ, c·σ²) = c·w1(eigs, γ, σ²). eigs: as for
    `kl_to_mp` (for γ > 1 the non-zero eigenvalues only).
    """
    gamma = _check_gamma(gamma)
    sigma2 = _check_sigma2(sigma2)
    eigs = _check_eigs(eigs)
    return float(w1_to_mp_batch(eigs[None, :], gamma, np.array([sigma2]))[0])


def w1_to_mp_batch(eigs: np.ndarray, gamma: float, sigma2: np.ndarray) -> np.ndarray:
    """`w1_to_mp` for F spectra of the same size at once: eigs [F, N], sigma2 [F] -> [F]."""
    x = np.sort(np.asarray(eigs, dtype=np.float64), axis=1)
    size = x.shape[1]
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    grid, cdf = _unit_cdf_table(round(gamma, 12))
    # G at the table nodes: trapezoid in q is exact for a piecewise-linear quantile.
    g_nodes = np.concatenate([[0.0], np.cumsum(np.diff(cdf) * 0.5 * (grid[1:] + grid[:-1]))])

    def partial_mean(q):  # G(q) = ∫₀^q F⁻¹_MP(u) du, unit σ²
        j = np.clip(np.searchsorted(cdf, q, side="right") - 1, 0, cdf.size - 2)
        return g_nodes[j] + (q - cdf[j]) * 0.5 * (grid[j] + np.interp(q, cdf, grid))

    a = np.arange(size, dtype=np.float64) / size
    b = np.arange(1, size + 1, dtype=np.float64) / size
    xu = x / sigma2[:, None]
    qstar = np.clip(np.interp(xu, grid, cdf, left=0.0, right=1.0), a, b)
    ga, gb, gs = partial_mean(a), partial_mean(b), partial_mean(qstar)
    # ∫_a^b |x − Q| = x(q*−a) − (G(q*)−G(a)) + (G(b)−G(q*)) − x(b−q*)
    pieces = xu * (2.0 * qstar - a - b) - 2.0 * gs + ga + gb
    return sigma2 * np.maximum(np.sum(np.maximum(pieces, 0.0), axis=1), 0.0)
