"""EigenShield: project embeddings onto the robust ("causal") part of the spike
subspace of clean reference embeddings, dropping the directions attacks exploit.

Method (after Darabi et al., "EigenShield", arXiv:2502.14976; no public code,
so the details below are ours and documented as such):

1. Spiked-covariance model of the reference rows X [N, d]: mean μ, sample
   covariance S = XcᵀXc/n with n = N−1 (centring costs one degree of freedom).
   Eigenvalues ≤ λ_max·1e-9 are structural zeros (constant or linearly dependent
   coordinates: all-MiniLM-L6-v2 has 3) and are left out of the noise model, so
   p = d − (extra zeros) and γ = p/n.
2. Robust noise level σ² (`rmt.sigma2_median` or `rmt.sigma2_mppca`) and the
   edge: the Tracy–Widom margin `rmt.tw_edge_margin(p, n, alpha, σ²)` above the
   MP edge σ²(1+√γ)² (or the plain MP edge when alpha is None). Eigenvectors
   with eigenvalue above the edge are the spikes.
3. RbNS — how much a direction moves when the reference data is perturbed.
   Perturbation: R random splits of the rows into two disjoint halves A, B
   (each centred by its own mean; optionally plus isotropic noise of variance
   noise·σ²). With Π_A, Π_B the projectors onto the top-k eigenvectors of each
   half's covariance (k = s, the number of spikes of the full fit),

       RbNS(u) = 1 − median_r ⟨Π_A u, Π_B u⟩ = 1 − median_r uᵀ Π_A Π_B u.

   0: u reappears intact in both of two independent halves; ≈ 1: it does not
   (noise). Why: (i) disjoint halves are independent samples — with the usual
   bootstrap a resample shares ~63% of its rows with the full data, so the full
   data's own noise directions partly reappear and look robust; (ii) comparing
   with the halves' spike *subspace*, not single eigenvectors, keeps spikes of
   (nearly) equal strength, which rotate among themselves from sample to sample
   while their span stays put — a per-eigenvector match would reject them;
   (iii) it follows the spiked model: a spike of population strength ℓ has
   overlap² ≈ (1 − γ_h/(ℓ−1)²)/(1 + γ_h/(ℓ−1)) with its estimate from a half
   (γ_h = 2γ; Paul 2007), so RbNS falls from ≈ 1 at the BBP threshold to ≈ 0
   for strong spikes. Unnormalised on purpose: a direction with little energy
   in the halves' subspaces scores ≈ 1, never "robust by normalisation".
4. Thresholds. (a) Quantile: the null is the h = min(null_dirs, m/2 − s)
   directions just below the edge, the j-th scored against the halves' top-(s+j)
   subspaces — as if the edge had let it in; τ = the q-quantile of their RbNS and
   a spike needs RbNS ≤ τ. (b) max_rbns (default 0.5): at least half of its
   energy must reappear. (b) is what rejects noise that crossed the edge: the
   full data's top noise direction is partly *selected for* agreeing across the
   halves (it is where their noise happens to line up), so it scores below the
   null more often than q says — measured on pure noise (d = 48, 97, N = 20d,
   alpha = 0.5 so that ~half the fits have a false spike): 4 of 20 false spikes
   pass (a) at q = 0.01, none pass (a) and (b). The TW margin (alpha) is the
   first guard; RbNS is the second, and the one that drops weak, unreliable
   spikes. Kept spikes are the "causal" ones.
5. project(x) = μ + U Uᵀ(x − μ) with U the kept eigenvectors, plus per row the
   energy outside the subspace ‖x − y‖² and a nonconformity score = that energy
   over its mean on the reference rows (1 on average for reference-like rows).
6. Verdicts (split conformal, Vovk et al.; Lei et al. 2018): a shield carries the
   sorted scores of calibration rows (`calibrate`; `fit` uses its own reference
   rows, in-sample, which sit slightly low when N is not ≫ d); `score_threshold(q)`
   is their ⌈(M+1)q⌉-th smallest, so a new clean row exchangeable with held-out
   calibration rows scores above it with probability ≤ 1 − q.

numpy only at import; `project_torch` imports torch lazily (the tap's path) and
computes the same formulas. A fitted shield is saved as a versioned .npz
(`save`/`load`, atomic write) carrying the sha256 of the fitting data; version 2
adds the calibration scores (version 1 files still load, with none).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np

from . import rmt

FORMAT = "eigenwatch.shield"
VERSION = 2  # 2: + calib_scores
READ_VERSIONS = (1, 2)
SIGMA2_METHODS = ("median", "mppca")
_ZERO_TOL = 1e-9  # eigenvalues ≤ λ_max·tol are structural zeros (float32 inputs round at ~1e-14 relative)


@dataclass(frozen=True)
class ShieldConfig:
    sigma2: str = "median"  # robust noise level: "median" (Gavish–Donoho) or "mppca" (Veraart)
    alpha: float | None = 0.01  # Tracy–Widom false-alarm level of the edge; None = plain MP edge
    quantile: float = 0.01  # q: keep a spike when its RbNS ≤ the q-quantile of the null's RbNS ...
    max_rbns: float = 0.5  # ... and ≤ this: at least half its energy must reappear across halves
    splits: int = 16  # R random half-splits for RbNS
    null_dirs: int = 16  # directions just below the edge whose RbNS form the null
    noise: float = 0.0  # extra isotropic noise added to each half, variance in units of σ²
    seed: int = 0

    def __post_init__(self):
        if self.sigma2 not in SIGMA2_METHODS:
            raise ValueError(f"sigma2: expected one of {SIGMA2_METHODS}, got {self.sigma2!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < 1.0):
            raise ValueError(f"alpha: expected None or a level in (0, 1), got {self.alpha!r}")
        if not (isinstance(self.quantile, (int, float)) and 0.0 <= self.quantile <= 1.0):
            raise ValueError(f"quantile: expected a level in [0, 1], got {self.quantile!r}")
        if not (isinstance(self.max_rbns, (int, float)) and 0.0 < self.max_rbns <= 2.0):
            raise ValueError(f"max_rbns: expected a score in (0, 2] (RbNS lies in [0, 2]), got {self.max_rbns!r}")
        if isinstance(self.splits, bool) or not isinstance(self.splits, (int, np.integer)) or self.splits < 1:
            raise ValueError(f"splits: expected an integer >= 1, got {self.splits!r}")
        if isinstance(self.null_dirs, bool) or not isinstance(self.null_dirs, (int, np.integer)) or self.null_dirs < 1:
            raise ValueError(f"null_dirs: expected an integer >= 1, got {self.null_dirs!r}")
        if not (isinstance(self.noise, (int, float)) and np.isfinite(self.noise) and self.noise >= 0.0):
            raise ValueError(f"noise: expected a finite variance ratio >= 0, got {self.noise!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")


class Projection(NamedTuple):
    y: np.ndarray  # [B, d] filtered rows, μ + U Uᵀ(x − μ)
    energy: np.ndarray  # [B] ‖x − y‖², the energy outside the subspace
    score: np.ndarray  # [B] energy / (its mean over the reference rows)


@dataclass(frozen=True, eq=False)
class Shield:
    mean: np.ndarray  # [d]
    spike_vectors: np.ndarray  # [d, s] orthonormal eigenvectors above the edge, strongest first
    spike_eigvals: np.ndarray  # [s] their eigenvalues, descending
    rbns: np.ndarray  # [s] RbNS of each spike eigenvector
    null_rbns: np.ndarray  # [h] RbNS of the h directions just below the edge (the null)
    kept: np.ndarray  # [s] bool: RbNS ≤ threshold and ≤ max_rbns — the causal spikes
    basis: np.ndarray  # [d, k] the kept spike vectors (k = kept.sum()), what project uses
    threshold: float  # q-quantile of null_rbns (NaN when there are no spikes to judge)
    sigma2: float  # robust noise level
    edge: float  # eigenvalue threshold for a spike (TW margin or plain MP edge)
    total_var: float  # trace of the sample covariance
    resid_mean: float  # mean ‖x − y‖² over the reference rows (the score's unit)
    n_rows: int  # N
    p: int  # variables in the noise model (d minus extra structural zeros)
    data_sha256: str  # sha256 of the fitting data (see `data_sha256`)
    config: ShieldConfig
    # [M] nonconformity scores of the calibration rows under this basis, ascending
    # (`calibrate`; empty: none, e.g. a version-1 file or a with_thresholds that changed the basis)
    calib_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        return int(self.basis.shape[1])

    def project(self, x) -> Projection:
        return project(self, x)

    def project_torch(self, x):
        return project_torch(self, x)


# --------------------------------------------------------------------------- fit


def data_sha256(reference) -> str:
    """sha256 over "N×d:float64:" and the rows as C-ordered float64 bytes (so a
    float32 copy of the same data hashes the same after conversion)."""
    x = np.ascontiguousarray(np.asarray(reference, dtype=np.float64))
    h = hashlib.sha256(f"{x.shape[0]}x{x.shape[1]}:float64:".encode())
    h.update(x.tobytes())
    return h.hexdigest()


def _check_reference(reference) -> np.ndarray:
    x = np.asarray(reference)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"reference: expected a real numeric array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"reference: expected [N, d], got shape {tuple(x.shape)}")
    if x.shape[0] < 4 or x.shape[1] < 1:
        raise ValueError(f"reference: expected [N, d] with N >= 4 rows (two halves of >= 2) and d >= 1, got {tuple(x.shape)}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("reference: contains NaN or Inf")
    return x


def _eigh_desc(xc: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of xcᵀxc/n, descending; only the min(N, d) that can be non-zero.
    xc: [N, d] centred rows. Returns lam [m], vecs [d, m]."""
    rows, d = xc.shape
    if rows >= d:
        lam, vecs = np.linalg.eigh(xc.T @ xc / n)  # [d], [d, d]
        return lam[::-1], vecs[:, ::-1]
    # Fewer rows than columns: the N×N Gram has the same non-zero eigenvalues;
    # eigenvectors map back by u = xcᵀv/√(n·λ).
    lam, v = np.linalg.eigh(xc @ xc.T / n)  # [N], [N, N]
    lam, v = lam[::-1], v[:, ::-1]
    pos = lam > lam[0] * _ZERO_TOL if lam[0] > 0 else np.zeros_like(lam, dtype=bool)
    vecs = np.zeros((d, rows))
    vecs[:, pos] = xc.T @ v[:, pos] / np.sqrt(n * lam[pos])
    return lam, vecs


def _noise_model(lam: np.ndarray, d: int, n: int, cfg: ShieldConfig) -> tuple[float, float, int, int]:
    """(σ², edge, p, m): m non-zero eigenvalues, p variables in the noise model."""
    if not lam[0] > 0:
        raise ValueError("reference: all rows are identical (zero variance); nothing to fit")
    m = int(np.sum(lam > lam[0] * _ZERO_TOL))
    # Zeros beyond the min(n, d) − rank forced by too few rows are dead coordinates:
    # they carry no noise either, so they leave the MP model.
    p = d - (min(d, n) - m)
    gamma = p / n
    if cfg.sigma2 == "median":
        sigma2 = rmt.sigma2_median(lam[:m], gamma)
    else:
        sigma2 = rmt.sigma2_mppca(np.concatenate([lam[:m], np.zeros(p - m)]), n)
    if not sigma2 > 0:
        raise ValueError(f"reference: the {cfg.sigma2} noise estimate is {sigma2!r}; the spectrum has no noise bulk")
    if cfg.alpha is None:
        edge = rmt.mp_edges(gamma, sigma2)[1]
    else:
        edge = rmt.tw_edge_margin(p, n, cfg.alpha, sigma2)
    return float(sigma2), float(edge), p, m


def _half_subspace(xh: np.ndarray, k: int, noise_sd: float, rng: np.random.Generator) -> np.ndarray:
    # xh: [h, d] rows of one half -> [d, k'] its top-k' eigenvectors (k' ≤ its rank)
    if noise_sd > 0:
        xh = xh + rng.normal(scale=noise_sd, size=xh.shape)
    xc = xh - xh.mean(axis=0)
    lam, vecs = _eigh_desc(xc, max(xh.shape[0] - 1, 1))
    top = min(k, int(np.sum(lam > lam[0] * _ZERO_TOL)) if lam[0] > 0 else 0)
    return vecs[:, :top]


def rbns_scores(x: np.ndarray, dirs: np.ndarray, ks, splits: int, noise_sd: float, seed: int) -> np.ndarray:
    """RbNS of each column u_i of dirs [d, m]: 1 − median over `splits` random
    half-splits of ⟨Π_A u_i, Π_B u_i⟩, Π_H the projector on half H's top-ks[i]
    eigenvectors (ks: [m] ints ≥ 1)."""
    ks = np.asarray(ks, dtype=np.int64)
    rows, half = x.shape[0], x.shape[0] // 2
    rng = np.random.default_rng(seed)
    agree = np.empty((splits, dirs.shape[1]))
    for r in range(splits):
        perm = rng.permutation(rows)
        qa = _half_subspace(x[perm[:half]], int(ks.max()), noise_sd, rng)  # [d, ka]
        qb = _half_subspace(x[perm[half : 2 * half]], int(ks.max()), noise_sd, rng)  # [d, kb]
        ca, cb, g = qa.T @ dirs, qb.T @ dirs, qa.T @ qb  # [ka, m], [kb, m], [ka, kb]
        # uᵀ Π_A Π_B u = (Q_Aᵀu)ᵀ (Q_AᵀQ_B) (Q_Bᵀu) on the leading ks[i] columns of each half
        for k in np.unique(ks):
            cols = np.flatnonzero(ks == k)
            ka, kb = min(k, qa.shape[1]), min(k, qb.shape[1])
            agree[r, cols] = np.einsum("am,am->m", ca[:ka, cols], g[:ka, :kb] @ cb[:kb, cols])
    return 1.0 - np.median(agree, axis=0)


def _assemble(mean, vecs, lam_s, rbns, null, sigma2, edge, total_var, n_rows, p, sha, cfg, calib=None) -> Shield:
    """The shield for cfg.quantile, from a fit's spectral part and scores."""
    s = lam_s.shape[0]
    if s:
        threshold = float(np.quantile(null, cfg.quantile))
        kept = (rbns <= threshold) & (rbns <= cfg.max_rbns)
    else:
        threshold, kept = float("nan"), np.zeros(0, dtype=bool)
    basis = np.ascontiguousarray(vecs[:, kept])  # [d, k]
    # Mean residual energy of the reference rows: the kept columns are eigenvectors of the
    # sample covariance, so it is (N−1)/N·(trace − Σ kept λ), no pass over the data needed.
    resid = (n_rows - 1) / n_rows * (total_var - float(np.sum(lam_s[kept])))
    # Everything kept: energy outside is new. Floor the unit so the score stays finite.
    resid = max(resid, total_var * 1e-12)
    return Shield(mean, vecs, lam_s, rbns, null, kept, basis, threshold, float(sigma2), float(edge),
                  float(total_var), float(resid), int(n_rows), int(p), sha, cfg,
                  np.zeros(0) if calib is None else calib)


def fit(reference, config: ShieldConfig | None = None) -> Shield:
    """Fit a shield to clean reference embeddings [N, d] (N ≥ 4)."""
    cfg = config if config is not None else ShieldConfig()
    if not isinstance(cfg, ShieldConfig):
        raise ValueError(f"config: expected a ShieldConfig, got {type(cfg).__name__}")
    x = _check_reference(reference)  # [N, d] float64
    rows, d = x.shape
    n = rows - 1
    mean = x.mean(axis=0)  # [d]
    lam, vecs = _eigh_desc(x - mean, n)  # [min(N, d)], [d, min(N, d)]
    sigma2, edge, p, m = _noise_model(lam, d, n, cfg)
    s = int(np.sum(lam[:m] > edge))  # spikes
    if s:
        # The null: the h directions just below the edge, the j-th judged against the halves'
        # top-(s+j) subspaces — scored as if the edge had let it in, so it carries the same
        # selection effect as a noise direction that crossed the edge. Kept to the lower half
        # of the spectrum's directions: subspaces that fill the space capture everything.
        h = min(cfg.null_dirs, m // 2 - s)
        if h < 1:
            raise ValueError(
                f"reference: {s} of its {m} non-zero directions lie above the edge {edge:.4g} (sigma2={cfg.sigma2!r}); "
                f"RbNS needs the spikes to be fewer than half of them. Use more rows (N={rows}, d={d})"
                + (" or sigma2='median'" if cfg.sigma2 == "mppca" else "")
            )
        ks = np.concatenate([np.full(s, s), s + np.arange(1, h + 1)])
        scores = rbns_scores(x, vecs[:, : s + h], ks, cfg.splits, float(np.sqrt(cfg.noise * sigma2)), cfg.seed)
        rbns, null = scores[:s], scores[s:]
    else:
        rbns, null = np.zeros(0), np.zeros(0)
    shield = _assemble(mean, np.ascontiguousarray(vecs[:, :s]), lam[:s].copy(), rbns, null, sigma2, edge,
                       float(np.sum(lam[:m])), rows, p, data_sha256(x), cfg)
    return calibrate(shield, x)  # in-sample; calibrate again on held-out rows for the conformal guarantee


def with_thresholds(shield: Shield, quantile: float | None = None, max_rbns: float | None = None) -> Shield:
    """The same fit kept at another quantile and/or max_rbns (no refit: the RbNS
    do not depend on them). None keeps the shield's own value. The calibration
    scores stay when the kept directions do; otherwise they are dropped (they
    belong to the old basis): `calibrate` the result again."""
    changes = {k: v for k, v in (("quantile", quantile), ("max_rbns", max_rbns)) if v is not None}
    cfg = replace(shield.config, **changes)  # validates
    out = _assemble(shield.mean, shield.spike_vectors, shield.spike_eigvals, shield.rbns, shield.null_rbns,
                    shield.sigma2, shield.edge, shield.total_var, shield.n_rows, shield.p, shield.data_sha256, cfg)
    return replace(out, calib_scores=shield.calib_scores) if np.array_equal(out.kept, shield.kept) else out


def calibrate(shield: Shield, x) -> Shield:
    """The same shield with the nonconformity scores of rows x [M, d] (M ≥ 1,
    finite; computed in float64) as its calibration scores."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] != shield.dim or x.dtype.kind not in "fiu":
        raise ValueError(f"calibration rows: expected a real [M, {shield.dim}] array with M >= 1, "
                         f"got {x.dtype} {tuple(x.shape)}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("calibration rows: contain NaN or Inf")
    return replace(shield, calib_scores=np.sort(project(shield, x).score), _cache={})


def score_threshold(shield: Shield, quantile: float) -> float:
    """The split-conformal threshold at level `quantile` in (0, 1): the
    ⌈(M+1)·quantile⌉-th smallest of the M calibration scores, +inf when that
    exceeds M (too few rows to reject anything at this level). A row whose
    score is above it is out of distribution at that level."""
    if not (isinstance(quantile, (int, float)) and 0.0 < quantile < 1.0):
        raise ValueError(f"quantile: expected a level in (0, 1), got {quantile!r}")
    m = shield.calib_scores.shape[0]
    if m == 0:
        raise ValueError("the shield has no calibration scores (a version-1 file, or with_thresholds changed its "
                         "basis): calibrate(shield, rows) or refit it")
    rank = int(np.ceil((m + 1) * quantile))
    return float("inf") if rank > m else float(shield.calib_scores[rank - 1])


# --------------------------------------------------------------------------- project


def _params(shield: Shield, dtype) -> tuple[np.ndarray, np.ndarray]:
    key = ("np", np.dtype(dtype).str)
    got = shield._cache.get(key)
    if got is None:
        got = (shield.mean.astype(dtype), np.ascontiguousarray(shield.basis.astype(dtype)))
        shield._cache[key] = got
    return got


def project(shield: Shield, x) -> Projection:
    """Filter rows x [B, d]: float64 in, float64 math; anything else in float32.
    Non-finite rows give non-finite outputs (the caller validates values)."""
    x = np.asarray(x)
    d = shield.dim
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"x: expected [B, {d}], got shape {tuple(x.shape)}")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"x: expected a real numeric array, got dtype {x.dtype}")
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    mean, basis = _params(shield, dtype)
    xc = x.astype(dtype, copy=False) - mean  # [B, d]
    inside = (xc @ basis) @ basis.T  # [B, d]
    resid = xc - inside  # [B, d]
    energy = np.einsum("bd,bd->b", resid, resid)  # [B]
    inside += mean
    return Projection(inside, energy, energy / dtype(shield.resid_mean))


def project_torch(shield: Shield, x):
    """The same filter for torch tensors (the tap): float64 stays float64, other
    dtypes compute and return float32. Returns (y [B, d], energy [B], score [B])."""
    import torch

    d = shield.dim
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"x: expected [B, {d}], got shape {tuple(x.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    key = ("torch", str(x.device), str(dtype))
    got = shield._cache.get(key)
    if got is None:
        got = (
            torch.as_tensor(shield.mean, dtype=dtype, device=x.device),
            torch.as_tensor(shield.basis, dtype=dtype, device=x.device).contiguous(),
        )
        shield._cache[key] = got
    mean, basis = got
    xc = x.to(dtype) - mean  # [B, d]
    inside = (xc @ basis) @ basis.T  # [B, d]
    resid = xc - inside
    energy = (resid * resid).sum(dim=1)  # [B]
    return inside + mean, energy, energy / shield.resid_mean


# --------------------------------------------------------------------------- file format


class ShieldFileError(ValueError):
    """A shield file that cannot be used; the message names the file and the problem."""


def save(shield: Shield, path) -> None:
    """Write `shield` to path (.npz) atomically: a temp file in the same
    directory, fsync, then os.replace — readers see the old file or the new one."""
    path = os.fspath(path)
    arrays = {
        "format": np.array(FORMAT),
        "version": np.array(VERSION, dtype=np.int64),
        "mean": shield.mean,
        "spike_vectors": shield.spike_vectors,
        "spike_eigvals": shield.spike_eigvals,
        "rbns": shield.rbns,
        "null_rbns": shield.null_rbns,
        "kept": shield.kept,
        "scalars": np.array([shield.sigma2, shield.edge, shield.total_var]),
        "counts": np.array([shield.n_rows, shield.p], dtype=np.int64),
        "data_sha256": np.array(shield.data_sha256),
        "config": np.array(json.dumps(asdict(shield.config), sort_keys=True)),
        "calib_scores": shield.calib_scores,
    }
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


_ARRAYS = ("mean", "spike_vectors", "spike_eigvals", "rbns", "null_rbns", "kept", "scalars", "counts")


def _need(z, name: str, path: str) -> np.ndarray:
    if name not in z.files:
        raise ShieldFileError(f"shield file {path}: missing field {name!r} (corrupt or not a shield file)")
    return z[name]


def load(path) -> Shield:
    """Read a shield written by `save`. Raises FileNotFoundError for a missing
    file and ShieldFileError (naming the file) when it is corrupt, of another
    format or version, or its arrays have inconsistent shapes or values."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt = str(_need(z, "format", path))
            if fmt != FORMAT:
                raise ShieldFileError(f"shield file {path}: format {fmt!r}, expected {FORMAT!r}")
            version = int(_need(z, "version", path))
            if version not in READ_VERSIONS:
                raise ShieldFileError(
                    f"shield file {path}: version {version}, this eigenwatch reads versions "
                    f"{', '.join(map(str, READ_VERSIONS))}; refit or upgrade"
                )
            a = {k: _need(z, k, path) for k in _ARRAYS}
            # version 1 has no calibration scores
            a["calib_scores"] = _need(z, "calib_scores", path) if version >= 2 else np.zeros(0)
            sha, cfg_json = str(_need(z, "data_sha256", path)), str(_need(z, "config", path))
    except (FileNotFoundError, ShieldFileError):
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ShieldFileError(f"shield file {path}: corrupt or not an .npz ({type(exc).__name__}: {exc})") from exc

    def bad(problem: str) -> ShieldFileError:
        return ShieldFileError(f"shield file {path}: {problem}")

    mean, vecs = a["mean"], a["spike_vectors"]
    if mean.ndim != 1 or mean.dtype.kind != "f" or mean.shape[0] < 1:
        raise bad(f"wrong shape: mean should be a float vector [d], got {mean.dtype} {mean.shape}")
    d = mean.shape[0]
    if vecs.ndim != 2 or vecs.shape[0] != d or vecs.shape[1] > d or vecs.dtype.kind != "f":
        raise bad(f"wrong shape: spike_vectors should be float [{d}, s] with s <= {d}, got {vecs.dtype} {vecs.shape}")
    s = vecs.shape[1]
    for name in ("spike_eigvals", "rbns", "kept"):
        if a[name].shape != (s,):
            raise bad(f"wrong shape: {name} should be [{s}] (one per spike vector), got {a[name].shape}")
    if a["kept"].dtype != bool:
        raise bad(f"kept: expected bool, got {a['kept'].dtype}")
    if a["null_rbns"].ndim != 1 or a["scalars"].shape != (3,) or a["counts"].shape != (2,):
        raise bad(f"wrong shape: expected null_rbns [h], scalars [3], counts [2], got "
                  f"{a['null_rbns'].shape}, {a['scalars'].shape}, {a['counts'].shape}")
    if s and a["null_rbns"].shape[0] < 1:
        raise bad("null_rbns is empty but there are spikes to judge")
    if not all(np.all(np.isfinite(a[k])) for k in ("mean", "spike_vectors", "spike_eigvals", "rbns", "null_rbns", "scalars")):
        raise bad("contains NaN or Inf")
    cs = a["calib_scores"]
    if cs.ndim != 1 or (cs.size and cs.dtype.kind != "f"):
        raise bad(f"wrong shape: calib_scores should be a float vector [M], got {cs.dtype} {cs.shape}")
    if cs.size and not (np.all(np.isfinite(cs)) and cs[0] >= 0 and np.all(np.diff(cs) >= 0)):
        raise bad("calib_scores: expected finite scores >= 0 in ascending order (edited or corrupt)")
    if s:
        err = float(np.max(np.abs(vecs.T @ vecs - np.eye(s))))
        if err > 1e-6:
            raise bad(f"spike_vectors are not orthonormal (max |VᵀV − I| = {err:.3g})")
    sigma2, edge, total_var = (float(v) for v in a["scalars"])
    n_rows, p = (int(v) for v in a["counts"])
    if not (sigma2 > 0 and total_var > 0 and n_rows >= 4 and 1 <= p <= d):
        raise bad(f"expected sigma2 > 0, total_var > 0, n_rows >= 4 and 1 <= p <= {d}; got "
                  f"sigma2={sigma2}, total_var={total_var}, n_rows={n_rows}, p={p}")
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise bad(f"data_sha256: expected 64 hex digits, got {sha!r}")
    try:
        config = ShieldConfig(**json.loads(cfg_json))
    except (ValueError, TypeError) as exc:
        raise bad(f"config: {exc}") from exc
    shield = _assemble(mean.astype(np.float64), np.ascontiguousarray(vecs, dtype=np.float64),
                       a["spike_eigvals"].astype(np.float64), a["rbns"].astype(np.float64),
                       a["null_rbns"].astype(np.float64), sigma2, edge, total_var, n_rows, p, sha, config,
                       cs.astype(np.float64))
    if not np.array_equal(shield.kept, a["kept"]):
        raise bad(f"kept does not match rbns <= min(quantile-{config.quantile} threshold of null_rbns, "
                  f"max_rbns={config.max_rbns}) (edited or corrupt)")
    return shield
