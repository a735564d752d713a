"""Float64 references: the slow, obviously-correct versions of every kernel.

Tests compare the fast paths against these on awkward shapes; benchmarks in
bench/ import this same module (``sys.path`` gets ``tests/``), so a benchmark
and its test never drift apart. numpy only at import (scipy and torch inside
the functions that need them).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


# ---- window spectra (kernels/gram.py, kernels/window_bank.py, the Triton ops) ----


def centred_gram(x) -> np.ndarray:
    """x: [W, d] window rows -> [W, W] float64 Xc Xcᵀ / d, Xc centred over tokens.
    Rows are shifted by the first row before centring (the same Xc in exact
    arithmetic), so equal rows centre to exactly 0."""
    x = np.array(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"x: expected a [W, d] window, got shape {x.shape}")
    x = x - x[:1]
    xc = x - x.mean(axis=0, keepdims=True)
    return xc @ xc.T / x.shape[1]


def window_eigenvalues(x) -> np.ndarray:
    """x: [W, d] -> [W] descending eigenvalues of the centred Gram / d, clamped at 0."""
    return np.clip(np.linalg.eigvalsh(centred_gram(x))[::-1], 0.0, None)


def window_spectrum(x) -> tuple[np.ndarray, np.ndarray]:
    """x: [W, d] -> (eigenvalues [W] descending, row_sq_norms [W] = ‖Xc_i‖²/d)."""
    g = centred_gram(x)
    return np.clip(np.linalg.eigvalsh(g)[::-1], 0.0, None), np.diagonal(g).copy()


def raw_grams(ring) -> np.ndarray:
    """ring: [S, W, k] -> [S, W, W] raw inner products."""
    r = np.asarray(ring, dtype=np.float64)
    return r @ r.transpose(0, 2, 1)


def centred_block_eigvalsh(gram, valid: int, dim: int, w: int) -> np.ndarray:
    """gram: [W, W] raw -> [w] descending eigenvalues of H G H / dim on the leading
    valid×valid block, clamped at 0, zeros after position valid (none below 2 rows)."""
    out = np.zeros(w)
    v = min(max(int(valid), 0), w)
    if v < 2:
        return out
    g = np.asarray(gram, dtype=np.float64)[:v, :v]
    h = np.eye(v) - 1.0 / v
    out[:v] = np.clip(np.linalg.eigvalsh(h @ g @ h / dim)[::-1], 0.0, None)
    return out


# ---- Marchenko–Pastur, Tracy–Widom, BBP (kernels/rmt.py) ----


def mp_edges(gamma: float, sigma2: float = 1.0) -> tuple[float, float]:
    return sigma2 * (1 - math.sqrt(gamma)) ** 2, sigma2 * (1 + math.sqrt(gamma)) ** 2


def mp_density(x: float, gamma: float, sigma2: float = 1.0) -> float:
    """Textbook MP density of the non-zero part, renormalised to mass 1 for γ > 1."""
    lo, hi = mp_edges(gamma, sigma2)
    if not lo < x < hi:
        return 0.0
    f = math.sqrt((hi - x) * (x - lo)) / (2 * math.pi * sigma2 * gamma * x)
    return f * gamma if gamma > 1 else f


def mp_cdf_quad(x: float, gamma: float, sigma2: float = 1.0) -> float:
    """The MP CDF by adaptive quadrature of the density (scipy.integrate.quad)."""
    from scipy import integrate

    lo, hi = mp_edges(gamma, sigma2)
    if x <= lo:
        return 0.0
    if x >= hi:
        return 1.0
    val, _ = integrate.quad(mp_density, lo, x, args=(gamma, sigma2), limit=200, epsabs=1e-12, epsrel=1e-10)
    return val


@lru_cache(maxsize=None)
def mp_median(gamma: float) -> float:
    from scipy import optimize

    lo, hi = mp_edges(gamma)
    return optimize.brentq(lambda x: mp_cdf_quad(x, gamma) - 0.5, lo, hi, xtol=1e-13)


@lru_cache(maxsize=None)
def mp_cdf_table(gamma: float, sigma2: float = 1.0, nodes: int = 40001) -> tuple[np.ndarray, np.ndarray]:
    """The MP CDF of the non-zero part on x = λ− + (λ+−λ−)·sin²(θ/2), θ uniform:
    the textbook density times dx/dθ (smooth at both edges, even at γ = 1),
    integrated by scipy's cumulative Simpson rule."""
    from scipy import integrate

    lo, hi = mp_edges(gamma, sigma2)
    theta = np.linspace(0.0, math.pi, nodes)
    x = lo + (hi - lo) * (0.5 - 0.5 * np.cos(theta))
    # f(x)·dx/dθ = (hi−lo)² sin²θ / (8πσ²γx); at γ = 1, θ = 0: x = 0 and the limit is hi/(2πσ²γ)
    safe = np.where(x > 0, x, 1.0)
    f = np.where(x > 0, (hi - lo) ** 2 * np.sin(theta) ** 2 / (8 * math.pi * sigma2 * gamma * safe),
                 hi / (2 * math.pi * sigma2 * gamma))
    cdf = np.concatenate([[0.0], integrate.cumulative_simpson(f, x=theta)])
    return x, cdf / cdf[-1]


def mp_quantile(q, gamma: float) -> np.ndarray:
    x, cdf = mp_cdf_table(round(gamma, 12))
    return np.interp(np.asarray(q, dtype=np.float64), cdf, x)


def mp_cdf(v, gamma: float) -> np.ndarray:
    x, cdf = mp_cdf_table(round(gamma, 12))
    return np.interp(np.asarray(v, dtype=np.float64), x, cdf, left=0.0, right=1.0)


def tw1_cdf(s: float, nodes: int = 80, cut: float = 16.0) -> float:
    """F1(s) = det(I − B_s) on L²(0, ∞), B_s(x, y) = Ai(x + y + s) (Ferrari–Spohn),
    by Gauss–Legendre on [0, cut] (Bornemann's method)."""
    from scipy import special

    xg, wg = np.polynomial.legendre.leggauss(nodes)
    x, w = (xg + 1) * cut / 2, wg * cut / 2
    k = special.airy(x[:, None] + x[None, :] + s)[0]
    sw = np.sqrt(w)
    return float(np.linalg.det(np.eye(nodes) - sw[:, None] * k * sw[None, :]))


@lru_cache(maxsize=None)
def tw1_quantile(q: float) -> float:
    from scipy import optimize

    return optimize.brentq(lambda s: tw1_cdf(s) - q, -4.0, 6.0, xtol=1e-12)


def tw_margin(p: int, n: int, alpha: float, sigma2: float = 1.0) -> float:
    """Johnstone (2001): the 1−alpha point of λ_max(X Xᵀ/n) for X p×n with N(0, σ²)
    entries; the plain MP edge when n < 2."""
    if n < 2:
        return sigma2 * (1 + math.sqrt(p / n)) ** 2
    a, b = math.sqrt(n - 1), math.sqrt(p)
    return sigma2 * ((a + b) ** 2 + (a + b) * (1 / a + 1 / b) ** (1 / 3) * tw1_quantile(1 - alpha)) / n


def bbp(ell: float, gamma: float, sigma2: float = 1.0) -> float:
    """Where a population spike ℓ shows in the sample spectrum (stuck to the edge below 1+√γ)."""
    thr = 1 + math.sqrt(gamma)
    return sigma2 * (ell * (1 + gamma / (ell - 1)) if ell > thr else thr**2)


def mppca(eigs, n: int) -> tuple[float, int]:
    """Veraart et al. 2016 as the paper's loop over k: (σ², k signal components),
    on the m = min(p, n) non-zero eigenvalues of the smaller-side Gram
    (eigenvalues of XᵀX/p = λ·n/p when p > n)."""
    p = len(eigs)
    m, big = min(p, n), max(p, n)
    lam = sorted((float(v) * n / big for v in eigs), reverse=True)[:m]
    for k in range(m):
        rest = lam[k:]
        s2 = sum(rest) / len(rest)
        if rest[0] - rest[-1] <= 4 * math.sqrt((m - k) / big) * s2:
            return s2, k
    raise AssertionError("unreachable")


def sigma2_iqr(nz, gamma: float) -> float:
    asc = np.sort(np.asarray(nz, dtype=np.float64))
    p = asc.size
    u = (np.arange(p) + 0.5) / p
    keep = (u >= 0.25) & (u <= 0.75)
    return float(asc[keep].sum() / mp_quantile(u[keep], gamma).sum())


def kl_mp(eigs, gamma: float, sigma2: float, bins: int | None = None) -> float:
    """The documented estimator: B equal-MP-mass bulk bins (Rice rule by default)
    + 2 tail bins, Krichevsky–Trofimov ½ pseudo-counts on both sides."""
    e = np.asarray(eigs, dtype=np.float64)
    n = e.size
    if bins is None:
        bins = int(max(4, min(200, round(2.0 * n ** (1.0 / 3.0)))))
    lo, hi = mp_edges(gamma, sigma2)
    inner = sigma2 * mp_quantile(np.arange(1, bins) / bins, gamma)
    edges = np.concatenate([[-np.inf, lo], inner, [hi, np.inf]])
    counts, _ = np.histogram(e, bins=edges)
    model = np.concatenate([[0.0], np.full(bins, 1.0 / bins), [0.0]])
    denom = n + 0.5 * (bins + 2)
    p_hat, q_hat = (counts + 0.5) / denom, (n * model + 0.5) / denom
    return float(np.sum(p_hat * np.log(p_hat / q_hat)))


def w1_mp(eigs, gamma: float, sigma2: float) -> float:
    """W1 = ∫|F_emp − F_MP| dx (the CDF form), F_MP from the θ table, the integral
    exact for the empirical step function against piecewise-linear F_MP."""
    e = np.sort(np.asarray(eigs, dtype=np.float64))
    x, _ = mp_cdf_table(round(gamma, 12))
    xs = np.unique(np.concatenate([sigma2 * x, e, [0.0]]))
    f_mp = mp_cdf(xs / sigma2, gamma)
    f_emp = np.searchsorted(e, xs, side="right") / e.size
    d0, d1, h = f_emp[:-1] - f_mp[:-1], f_emp[:-1] - f_mp[1:], np.diff(xs)
    same = d0 * d1 >= 0
    denom = np.where(same, 1.0, np.abs(d0) + np.abs(d1))
    piece = np.where(same, 0.5 * h * (np.abs(d0) + np.abs(d1)), 0.5 * h * (d0**2 + d1**2) / denom)
    return float(piece.sum())


# ---- window descriptors (kernels/descriptors.py) ----

TW_ALPHA = 0.01


def describe(eigs, window: int, dim: int, rows=None) -> dict[str, float]:
    """Every descriptor of DESCRIPTOR_DOCS, written from its documentation, from
    a window's eigenvalues (and optionally its row squared norms)."""
    from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES

    lam = np.sort(np.asarray(eigs, dtype=np.float64))[::-1]
    lam = np.where(lam > 1e-12 * max(lam[0], 0.0), lam, 0.0)
    gamma = (window - 1) / dim
    p = min(window - 1, dim)
    nz = lam[:p]
    total = nz.sum()
    out = dict.fromkeys(DESCRIPTOR_NAMES, 0.0)
    out.update(gamma=gamma, window=float(window), ratio12=1.0)
    if total <= 0:
        return out
    mean = total / p
    pad = np.concatenate([nz, [0.0, 0.0, 0.0]])
    out["lambda1"] = nz[0]
    out["lambda1_rel"] = nz[0] / mean
    out["lambda2_rel"] = pad[1] / mean
    out["lambda3_rel"] = pad[2] / mean
    out["gap12_rel"] = (nz[0] - pad[1]) / mean
    out["gap23_rel"] = (pad[1] - pad[2]) / mean
    out["ratio12"] = nz[0] / max(pad[1], 1e-12 * nz[0])
    prob = nz[nz > 0] / total
    h = float(-np.sum(prob * np.log(prob)))
    out["spectral_entropy"] = h
    out["effective_rank"] = math.exp(h)
    out["eig_variance_rel"] = float(np.mean((nz - mean) ** 2) / mean**2)
    out["trace_mean"] = mean
    med = float(np.median(nz))
    s2 = med / mp_median(round(gamma, 12))
    out["sigma2"] = s2
    out["mp_edge"] = s2 * (1 + math.sqrt(gamma)) ** 2
    out["spikes"] = float(np.sum(nz > out["mp_edge"]))
    s2_iqr = sigma2_iqr(nz, gamma)
    out["spikes_tw"] = float(np.sum(nz > s2_iqr * tw_margin(window - 1, dim, TW_ALPHA)))
    # KL's bin edges come from the θ table: σ² from the table's own median keeps the
    # documented tie rule exact (the median eigenvalue sits on MP's median, a bin edge).
    med_table = float(mp_quantile(0.5, gamma))
    s2_table = med / med_table
    s2_fit = s2_table if s2_table > 0 else mean / max(1.0, gamma)
    if s2_table > 0:  # the tie rule: that eigenvalue counts in the bin above (bins are left-closed)
        unit = nz / s2_table
        unit[nz == med] = med_table
        out["kl_mp"] = kl_mp(unit, gamma, 1.0)
    else:
        out["kl_mp"] = kl_mp(nz, gamma, s2_fit)
    out["w1_mp"] = w1_mp(nz, gamma, s2_fit) / mean
    out["sigma2_mppca_rel"] = mppca(lam[: window - 1], dim)[0] / mean
    out["nuclear_rel"] = float(np.sum(np.sqrt(nz)) / math.sqrt(window * total))
    if rows is None:
        out["row_norm_mean"] = math.sqrt(total / window)
        out["l12_proxy"] = 1.0
    else:
        r = np.asarray(rows, dtype=np.float64)
        out["row_norm_mean"] = float(np.mean(np.sqrt(r)))
        out["l12_proxy"] = float(np.sum(np.sqrt(r)) / math.sqrt(window * r.sum()))
    return out


def window_norm_features(x) -> dict:
    """Norm features straight from the window (no eigenvalues): centred rows,
    their norms, and the singular values of Xc/√d."""
    x = np.asarray(x, dtype=np.float64)
    w, d = x.shape
    xc = (x - x.mean(axis=0)) / math.sqrt(d)
    norms = np.linalg.norm(xc, axis=1)
    fro = np.linalg.norm(xc)
    sv = np.linalg.svd(xc, compute_uv=False)
    return {
        "row_sq_norms": norms**2,
        "row_norm_mean": float(norms.mean()),
        "l12_proxy": float(norms.sum() / (math.sqrt(w) * fro)),
        "nuclear_rel": float(sv.sum() / (math.sqrt(w) * fro)),
    }


# ---- alert policy (monitor/sidecar/alerts.py) ----


def hysteresis_alerts(risk, high: float, low: float, persist: int) -> list[int]:
    """Indices of the steps that should alert, by the rule: risk > high for `persist`
    consecutive steps raises; nothing more until risk < low."""
    out, streak, armed = [], 0, True
    for i, r in enumerate(risk):
        streak = streak + 1 if r > high else 0
        if armed and streak >= persist:
            out.append(i)
            armed = False
        elif not armed and r < low:
            armed = True
    return out


# ---- offline detectors (monitor/llmcheck.py, monitor/mahalanobis.py) ----


def llmcheck_rows(h, ridge: float = 1e-3) -> float:
    """LLM-Check's hidden score from the T×d rows themselves: mean_i ½·log(σ_i² + ridge),
    σ_i the singular values of the token-centred matrix."""
    z = np.asarray(h, dtype=np.float64)
    z = z - z.mean(axis=0, keepdims=True)
    s = np.linalg.svd(z, compute_uv=False)
    return float(np.mean(0.5 * np.log(s * s + ridge)))


def oas_covariance(x, max_components: int) -> tuple[float, np.ndarray]:
    """(shrinkage ρ, the OAS-shrunk covariance) of the rows of x, written out
    densely (Chen et al. 2010, eq. 23 in the form scikit-learn uses), with the
    eigenvalues past max_components replaced by their mean."""
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    z = x - x.mean(0)
    s = z.T @ z / n
    mu = np.trace(s) / p
    alpha = np.mean(s**2)
    rho = min(1.0, (alpha + mu**2) / ((n + 1) * (alpha - mu**2 / p)))
    lam, u = np.linalg.eigh(s)
    lam, u = lam[::-1].copy(), u[:, ::-1]
    if p > max_components:
        lam[max_components:] = lam[max_components:].mean()
    return rho, (1 - rho) * (u * lam) @ u.T + rho * mu * np.eye(p)


# ---- streaming top-eigenvector sketches (kernels/sketch.py) ----

def stream_second_moment(blocks) -> np.ndarray:
    """AᵀA = Σ_t a_t a_tᵀ of a stream given as blocks [n_i, d], accumulated in float64 block by block."""
    total = None
    for block in blocks:
        x = np.asarray(block, dtype=np.float64)
        g = x.T @ x
        total = g if total is None else total + g
    if total is None:
        raise ValueError("blocks: the stream is empty")
    return total


def stream_top_eigvecs(blocks, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k eigenpairs of a stream's second-moment matrix (float64): (eigenvalues [k] descending,
    eigenvectors [d, k], each column's largest entry positive)."""
    w, u = np.linalg.eigh(stream_second_moment(blocks))
    w, u = w[::-1][:k], u[:, ::-1][:, :k]
    u = u * np.where(u[np.abs(u).argmax(0), np.arange(k)] < 0, -1.0, 1.0)
    return w, u


def oja_fixed_eta(v: np.ndarray, rows, eta: float) -> np.ndarray:
    """Plain fixed-η Oja, one row at a time in float64: v ← v + η a (aᵀv), normalised at the end of
    the block (the direction is that of Π_t (I + η a_t a_tᵀ) v). The baseline the sketches beat."""
    v = np.array(v, dtype=np.float64)
    for a in np.asarray(rows, dtype=np.float64):
        v += eta * a * (a @ v)
    return v / np.linalg.norm(v)


def largest_principal_angle_degrees(u, v) -> float:
    """Largest principal angle between span(u) and span(v), degrees, via scipy (float64)."""
    from scipy.linalg import subspace_angles

    a = np.asarray(u, dtype=np.float64)
    b = np.asarray(v, dtype=np.float64)
    a = a[:, None] if a.ndim == 1 else a
    b = b[:, None] if b.ndim == 1 else b
    return float(np.degrees(subspace_angles(a, b).max()))


# ---- Sparton sparse head (kernels/sparton.py, kernels/_sparton_kernel.py) ----


def sparse_head(hidden, mask, weight, bias=None) -> tuple[np.ndarray, np.ndarray]:
    """hidden [B, S, D], mask [B, S], weight [V, D], bias [V] | None
    -> (w [B, V] float64, argmax [B, V] int64).

    The naive SPLADE head: full [B, S, V] logits in float64, then over tokens
    with mask != 0 the max of log1p(relu(logit)). Where no unmasked logit is
    > 0 (all-masked rows included) w = 0 and argmax = -1; otherwise argmax is
    the first token holding the max (numpy.argmax's rule, the kernels' tie rule).
    """
    h = np.asarray(hidden, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    B, S, _ = h.shape
    V = w.shape[0]
    if S == 0:
        return np.zeros((B, V)), np.full((B, V), -1, dtype=np.int64)
    logits = np.einsum("bsd,vd->bsv", h, w)  # [B, S, V]
    if bias is not None:
        logits += np.asarray(bias, dtype=np.float64)
    logits = np.where(np.asarray(mask)[:, :, None] != 0, logits, -np.inf)
    top = logits.max(axis=1)  # [B, V]
    arg = logits.argmax(axis=1)
    pos = top > 0  # relu'(0) = 0: a max of exactly 0 gives no token
    out = np.where(pos, np.log1p(np.where(pos, top, 0.0)), 0.0)
    return out, np.where(pos, arg, -1).astype(np.int64)


def sparse_head_autograd(hidden, mask, weight, bias=None):
    """The same head in float64 torch with autograd, for gradient checks.

    hidden, weight, bias: torch tensors (any float dtype, requires_grad as the
    caller wants) -> w [B, V] float64. The gradient of w[b, v] flows through the
    one logit at the reference argmax (first maximal token), and is zero where
    w = 0, the subgradient the kernels use.
    """
    import torch

    def np64(t):
        return None if t is None else t.detach().to("cpu", torch.float64).numpy()

    _, arg = sparse_head(np64(hidden), np64(mask), np64(weight), np64(bias))
    logits = torch.einsum("bsd,vd->bsv", hidden.double(), weight.double())  # [B, S, V]
    if bias is not None:
        logits = logits + bias.double()
    idx = torch.as_tensor(arg, device=logits.device)  # [B, V]
    sel = logits.gather(1, idx.clamp_min(0)[:, None, :]).squeeze(1)  # [B, V]
    return torch.where(idx >= 0, torch.log1p(torch.relu(sel)), torch.zeros_like(sel))


# ---- EigenShield (kernels/shield.py) ----


def shield_spectrum(x, sigma2: str = "median", alpha: float | None = 0.01) -> dict:
    """Spectral part of shield.fit in float64 via the SVD of the centred rows
    (the kernel uses eigh of the covariance or of the Gram).

    x: [N, d]. Returns mean [d], eigvals [m] (non-zero, descending, of
    XcᵀXc/(N−1)), p, sigma2, edge, spike_eigvals [s], spike_vectors [d, s]
    (signs arbitrary: compare projectors). Structural zeros (≤ λ_max·1e-9)
    beyond the min(d, N−1) − rank forced by N leave the noise model: p = d − extra.
    """
    from eigenwatch.kernels import rmt

    x = np.asarray(x, dtype=np.float64)
    rows, d = x.shape
    n = rows - 1
    mean = x.mean(axis=0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)  # [min(N, d)], [min(N, d), d]
    lam = sv**2 / n
    m = int(np.sum(lam > lam[0] * 1e-9))
    p = d - (min(d, n) - m)
    gamma = p / n
    if sigma2 == "median":
        s2 = rmt.sigma2_median(lam[:m], gamma)
    else:
        s2 = rmt.sigma2_mppca(np.concatenate([lam[:m], np.zeros(p - m)]), n)
    edge = rmt.mp_edges(gamma, s2)[1] if alpha is None else rmt.tw_edge_margin(p, n, alpha, s2)
    s = int(np.sum(lam[:m] > edge))
    return {"mean": mean, "eigvals": lam[:m], "p": p, "sigma2": s2, "edge": edge,
            "spike_eigvals": lam[:s], "spike_vectors": vt[:s].T}


def shield_rbns(x, dirs, ks, splits: int, noise_sd: float, seed: int) -> np.ndarray:
    """RbNS in float64 with explicit d×d projectors: for each of `splits` random
    half-splits (rng = default_rng(seed): per split one permutation of the rows,
    then half A's noise draw, then half B's — the kernel's order), with P_H the
    projector on the top-ks[i] eigenvectors (SVD) of half H's centred rows,
    RbNS_i = 1 − median_r u_iᵀ P_A P_B u_i. dirs: [d, m]; ks: [m]."""
    x = np.asarray(x, dtype=np.float64)
    dirs = np.asarray(dirs, dtype=np.float64)
    rows, half = x.shape[0], x.shape[0] // 2
    rng = np.random.default_rng(seed)
    agree = np.empty((splits, dirs.shape[1]))

    def top_vectors(xh):
        if noise_sd > 0:
            xh = xh + rng.normal(scale=noise_sd, size=xh.shape)
        _, sv, vt = np.linalg.svd(xh - xh.mean(axis=0), full_matrices=False)
        rank = int(np.sum(sv**2 > sv[0] ** 2 * 1e-9)) if sv[0] > 0 else 0
        return vt[:rank].T  # [d, rank]

    for r in range(splits):
        perm = rng.permutation(rows)
        va, vb = top_vectors(x[perm[:half]]), top_vectors(x[perm[half : 2 * half]])
        for i, k in enumerate(ks):
            pa = va[:, :k] @ va[:, :k].T
            pb = vb[:, :k] @ vb[:, :k].T
            u = dirs[:, i]
            agree[r, i] = u @ pa @ pb @ u
    return 1.0 - np.median(agree, axis=0)


def shield_project(x, mean, basis, resid_mean: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """project in float64 with the explicit d×d projector P = U Uᵀ:
    y = μ + (x − μ)P, energy = ‖x − y‖², score = energy / resid_mean."""
    x = np.asarray(x, dtype=np.float64)
    u = np.asarray(basis, dtype=np.float64)
    proj = u @ u.T  # [d, d]
    y = mean + (x - mean) @ proj
    energy = np.sum((x - y) ** 2, axis=1)
    return y, energy, energy / resid_mean
