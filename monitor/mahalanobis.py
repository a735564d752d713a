"""Mahalanobis detectors (numpy only): a shrunk Gaussian fitted to reference
features, and three detectors on it, used by `calibrate` and `score`.

- ``descriptor_mahalanobis``: the per-text mean descriptor vector of every tapped
  layer, standardised by the reference mean/std, Ledoit–Wolf shrunk Gaussian;
  score = squared distance / p.
- ``hidden_mahalanobis``: the mean-pooled hidden state per tapped layer
  (Ledoit–Wolf); score = mean over layers of d²/d_layer. An anchor people compare against.
- ``token_mahalanobis``: per tapped layer an OAS-shrunk Gaussian over every token
  of the fit texts, fitted and scored from token sums (n, Σx, XᵀX:
  hooks/capture.py) so no rows are kept; score = mean over layers of the
  text's mean token d²/d. A text made of unusual tokens stays far however
  they average out.
"""

from __future__ import annotations

import numpy as np

from eigenwatch.kernels.hidden_stats import LowRankGaussian

MAX_COMPONENTS = 256  # eigen-directions of a sample covariance kept in a calibration file


class ShrinkageGaussian(LowRankGaussian):
    """Mean + Ledoit–Wolf shrunk covariance Σ = s·μ·I + (1 − s)·S, with S the
    sample covariance (1/n), μ = tr(S)/p and s the Ledoit–Wolf (2004) optimal
    shrinkage. Works for n < p: Σ is full rank whenever s > 0 and μ > 0.

    Stored in low-rank form (S = U Λ Uᵀ, at most min(n, p, MAX_COMPONENTS)
    directions; S's smaller eigenvalues, if any are dropped, count as 0), so the
    state is O(r·p) and Σ⁻¹ = (1/a)(I − U diag(bλ/(a + bλ)) Uᵀ), a = sμ, b = 1 − s.
    Distances, state and loading are kernels/hidden_stats.LowRankGaussian's (the
    live tap scores tokens with the same class).
    """

    def fit(self, X) -> "ShrinkageGaussian":
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] < 2:
            raise ValueError(f"ShrinkageGaussian.fit: need a 2-D array with >= 2 rows, got shape {X.shape}")
        n, p = X.shape
        self.mean = X.mean(axis=0)
        Z = X - self.mean
        # Eigen-decomposition of S through the smaller of the two Gram matrices.
        if n <= p:
            G = Z @ Z.T / n
            lam, V = np.linalg.eigh(G)
            keep = lam > 1e-12 * max(lam.max(), 1e-300)
            lam, V = lam[keep], V[:, keep]
            U = Z.T @ V / np.sqrt(n * lam)
        else:
            S = Z.T @ Z / n
            lam, U = np.linalg.eigh(S)
            keep = lam > 1e-12 * max(lam.max(), 1e-300)
            lam, U = lam[keep], U[:, keep]
        order = np.argsort(lam)[::-1]
        lam, U = lam[order], U[:, order]
        mu = float(lam.sum() / p)
        # Ledoit–Wolf: δ² = ||S − μI||²_F / p, β² = (1/n²) Σ_k ||z_k z_kᵀ − S||²_F / p.
        s_fro2 = float((lam ** 2).sum())
        delta2 = (s_fro2 - 2 * mu * lam.sum() + mu * mu * p) / p
        row4 = float(((Z ** 2).sum(axis=1) ** 2).sum())
        beta2 = (row4 - n * s_fro2) / (n * n) / p
        beta2 = min(max(beta2, 0.0), delta2)
        shrink = 1.0 if delta2 <= 0 else beta2 / delta2
        if mu <= 0:  # all reference rows identical: unit covariance
            mu, shrink = 1.0, 1.0
        self.shrinkage = float(shrink)
        self.a = max(shrink * mu, 1e-12 * mu)
        self.b = 1.0 - shrink
        r = min(len(lam), MAX_COMPONENTS)
        self.lam, self.U = lam[:r], U[:, :r]
        self.p = p
        return self

    @classmethod
    def from_moments(cls, n: int, total, scatter) -> "ShrinkageGaussian":
        """The same model from sums over n rows: Σx [p] and XᵀX [p, p] (float64),
        for when the rows themselves are too many to keep (every token of every
        reference text). The shrinkage is OAS (Chen, Wiesel, Eldar & Hero 2010),
        which needs only tr(S) and tr(S²) — Ledoit–Wolf needs every row. When p >
        MAX_COMPONENTS, the dropped directions get the mean of their eigenvalues
        (not 0 as in `fit`, where n ≤ MAX_COMPONENTS rows leave nothing to drop):
        here the covariance is full rank and its small directions are real."""
        if n < 2:
            raise ValueError(f"ShrinkageGaussian.from_moments: need >= 2 rows, got {n}")
        total = np.asarray(total, dtype=np.float64)
        scatter = np.asarray(scatter, dtype=np.float64)
        p = total.shape[0]
        if scatter.shape != (p, p):
            raise ValueError(f"ShrinkageGaussian.from_moments: scatter is {scatter.shape}, expected ({p}, {p})")
        g = cls()
        g.mean = total / n
        S = scatter / n - np.outer(g.mean, g.mean)
        lam, U = np.linalg.eigh(0.5 * (S + S.T))
        lam = np.maximum(lam[::-1], 0.0)
        U = U[:, ::-1]
        mu = float(lam.sum() / p)
        if mu <= 0:  # all rows identical: unit covariance
            g.shrinkage, g.a, g.b = 1.0, 1.0, 0.0
            g.lam, g.U, g.p = np.zeros(0), np.zeros((p, 0)), p
            return g
        # OAS: ρ = (tr(S²)/p² + μ²) / ((n + 1)(tr(S²)/p² − μ²/p)), capped at 1.
        m2 = float((lam ** 2).sum()) / (p * p)
        den = (n + 1.0) * (m2 - mu * mu / p)
        shrink = 1.0 if den <= 0 else min(1.0, (m2 + mu * mu) / den)
        r = min(p, MAX_COMPONENTS)
        rest = float(lam[r:].mean()) if r < p else 0.0
        g.shrinkage = float(shrink)
        g.b = 1.0 - shrink
        g.a = max(shrink * mu + g.b * rest, 1e-12 * mu)
        g.lam, g.U, g.p = lam[:r] - rest, U[:, :r], p
        return g

    def mean_sqdist_moments(self, n: int, total, scatter) -> float:
        """Mean over n rows of their squared Mahalanobis distance, from the rows'
        Σx [p] and XᵀX [p, p]: tr(Σ⁻¹ C), C = (1/n) Σ_t (x_t − m)(x_t − m)ᵀ."""
        mu = np.asarray(total, dtype=np.float64) / n
        S = np.asarray(scatter, dtype=np.float64) / n
        m = self.mean
        tr_c = float(np.trace(S) - 2.0 * mu @ m + m @ m)
        um, uu = self.U.T @ m, self.U.T @ mu  # [r]
        ucu = np.einsum("ir,ir->r", self.U, S @ self.U) - 2.0 * uu * um + um * um  # u_kᵀ C u_k
        return max(float(tr_c - (self.weights() * ucu).sum()) / self.a, 0.0)


class DescriptorMahalanobis:
    """Mahalanobis distance of the per-text mean descriptor vector (all layers)."""

    name = "descriptor_mahalanobis"

    def fit(self, feats: list[dict]) -> "DescriptorMahalanobis":
        X = np.stack([f["desc_mean"] for f in feats])
        self.loc = X.mean(axis=0)
        sd = X.std(axis=0)
        self.scale = np.where(sd > 1e-12 * (np.abs(self.loc) + 1e-30), sd, 1.0)
        self.gauss = ShrinkageGaussian().fit((X - self.loc) / self.scale)
        return self

    def score(self, feats: list[dict]) -> np.ndarray:
        X = np.stack([f["desc_mean"] for f in feats])
        return self.gauss.sqdist((X - self.loc) / self.scale) / self.gauss.p

    def state(self) -> dict:
        return {"loc": self.loc.tolist(), "scale": self.scale.tolist(), "gauss": self.gauss.state()}

    @classmethod
    def from_state(cls, st: dict) -> "DescriptorMahalanobis":
        d = cls()
        d.loc, d.scale = np.asarray(st["loc"]), np.asarray(st["scale"])
        d.gauss = ShrinkageGaussian.from_state(st["gauss"])
        return d


class HiddenMahalanobis:
    """Mahalanobis distance of mean-pooled hidden states, mean over tapped layers of d²/d."""

    name = "hidden_mahalanobis"

    def fit(self, feats: list[dict]) -> "HiddenMahalanobis":
        layers = sorted(int(k) for k in feats[0]["pooled"])
        self.gauss = {l: ShrinkageGaussian().fit(np.stack([f["pooled"][l] for f in feats])) for l in layers}
        return self

    def score(self, feats: list[dict]) -> np.ndarray:
        tot = np.zeros(len(feats))
        for l, g in self.gauss.items():
            tot += g.sqdist(np.stack([f["pooled"][l] for f in feats])) / g.p
        return tot / len(self.gauss)

    def state(self) -> dict:
        return {"layers": {str(l): g.state() for l, g in self.gauss.items()}}

    @classmethod
    def from_state(cls, st: dict) -> "HiddenMahalanobis":
        d = cls()
        d.gauss = {int(l): ShrinkageGaussian.from_state(g) for l, g in st["layers"].items()}
        return d


class TokenMoments:
    """Sums over every token of the texts seen, per tapped layer: what
    `TokenMahalanobis.from_moments` fits. Passed as `token=` to the extraction,
    which calls `observe` once per text and layer (the same sums the vLLM
    worker's capture mode returns, so both engines feed it alike)."""

    def __init__(self):
        self.sums: dict[int, list] = {}

    def observe(self, layer: int, n: int, total: np.ndarray, scatter: np.ndarray) -> None:
        acc = self.sums.get(layer)
        if acc is None:
            self.sums[layer] = [int(n), np.array(total, dtype=np.float64), np.array(scatter, dtype=np.float64)]
        else:
            acc[0] += int(n)
            acc[1] += total
            acc[2] += scatter
        return None


class TokenMahalanobis:
    """Token-level Mahalanobis distance: per tapped layer, one shrunk Gaussian
    (OAS) over every token of the fit texts; a text's value at a layer is the
    mean over its tokens of d²/d, computed from the text's (n, Σx, XᵀX) so it
    needs no rows kept; score = mean over layers. Where the pooled Mahalanobis
    averages the tokens first (and a few odd tokens vanish in the mean), this
    one averages distances: a text made of unusual tokens stays far however
    they average out."""

    name = "token_mahalanobis"

    @classmethod
    def from_moments(cls, acc: TokenMoments) -> "TokenMahalanobis":
        if not acc.sums:
            raise ValueError("TokenMahalanobis.from_moments: no tokens were observed")
        d = cls()
        d.gauss = {l: ShrinkageGaussian.from_moments(*acc.sums[l]) for l in sorted(acc.sums)}
        return d

    def observe(self, layer: int, n: int, total: np.ndarray, scatter: np.ndarray) -> float | None:
        g = self.gauss.get(layer)
        return None if g is None else g.mean_sqdist_moments(n, total, scatter) / g.p

    def fit(self, feats: list[dict]) -> "TokenMahalanobis":
        return self  # fitted from the token sums during extraction (TokenMoments)

    def score(self, feats: list[dict]) -> np.ndarray:
        return np.array([np.mean([f["token_maha"][l] for l in self.gauss]) for f in feats])

    def state(self) -> dict:
        return {"layers": {str(l): g.state() for l, g in self.gauss.items()}}

    @classmethod
    def from_state(cls, st: dict) -> "TokenMahalanobis":
        d = cls()
        d.gauss = {int(l): ShrinkageGaussian.from_state(g) for l, g in st["layers"].items()}
        return d
