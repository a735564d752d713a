"""Offline detectors (numpy only): each is a named class with
`fit(reference features)` and `score(features) -> np.ndarray` (higher = more
anomalous), plus `state()` / `from_state()` so a calibration file holds
everything `eigenwatch score` needs.

Features of one text (built by `eigenwatch.monitor.offline`) are a dict:

- ``spectra``: {layer: [(rel_eigs, window, dim, sigma2_rel, token_count), ...]} — each tap
  window's eigenvalues divided by its trace_mean, and the window's robust σ²
  (descriptor ``sigma2``) over its trace_mean: exactly what the live
  ``spectral_spike`` detector sees (monitor/detectors.py).
- ``desc_mean``: per-text mean of the descriptor vectors of each tapped layer,
  layers concatenated in layer order.
- ``pooled``: {layer: mean-pooled hidden state (vector of size d)}.
- ``llmcheck``: the LLM-Check hidden score of the middle tapped layer.
- ``token_maha``: {layer: mean over the text's tokens of d²/d} under the
  token-level reference Gaussian, when the extraction was given a fitted
  ``TokenMahalanobis`` (its ``observe`` turns a text's token sums into it).

Detectors:

- ``SpectralSpike``: per layer, σ² = median over reference windows of
  sigma2_rel and a threshold = ceil(0.99-quantile) of the reference windows'
  spike counts (the live sidecar's calibration). Score of a text =
  max over layers and windows of (spikes above the calibrated MP edge − that
  layer's threshold): > 0 means the live sidecar would flag a window.
- ``DescriptorMahalanobis``: descriptors standardised by the reference mean/std,
  then a Ledoit–Wolf shrunk Gaussian; score = squared Mahalanobis distance / p.
- ``HiddenMahalanobis``: per tapped layer a Ledoit–Wolf shrunk Gaussian on the
  mean-pooled hidden states; score = mean over layers of d²/d_layer.
- ``TokenMahalanobis``: per tapped layer an OAS-shrunk Gaussian over every
  token of the fit texts (fitted from token sums, ``TokenMoments``); score =
  mean over layers of the text's mean token d²/d.
- ``LLMCheckHidden``: two-sided robust deviation |s − median| / (1.4826·MAD) of
  the LLM-Check hidden score from the reference.
- ``Combined``: split conformal over one detector per source of evidence
  (``combined_voters``: EigenTrack speaks for the descriptor family). Each
  voter's p-value against its scores on calibration texts not used to fit it
  (an exponential tail orders the texts beyond the calibration maximum); the
  harmonic mean of those p-values, T = log Σ_j 1/p_j, is made conformal once
  more against the calibration texts' own T (leave-one-out):
  p = (1 + #{T_ref ≥ T}) / (n + 1).
  score = −log10 p; alert when p < the chosen false-alarm rate.
"""

from __future__ import annotations

import math

import numpy as np

from eigenwatch.kernels.descriptors import count_spikes

MAX_COMPONENTS = 256  # eigen-directions of a sample covariance kept in a calibration file


class ShrinkageGaussian:
    """Mean + Ledoit–Wolf shrunk covariance Σ = s·μ·I + (1 − s)·S, with S the
    sample covariance (1/n), μ = tr(S)/p and s the Ledoit–Wolf (2004) optimal
    shrinkage. Works for n < p: Σ is full rank whenever s > 0 and μ > 0.

    Stored in low-rank form (S = U Λ Uᵀ, at most min(n, p, MAX_COMPONENTS)
    directions; S's smaller eigenvalues, if any are dropped, count as 0), so the
    state is O(r·p) and Σ⁻¹ = (1/a)(I − U diag(bλ/(a + bλ)) Uᵀ), a = sμ, b = 1 − s.
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
        w = self.b * self.lam / (self.a + self.b * self.lam)
        return max(float(tr_c - (w * ucu).sum()) / self.a, 0.0)

    def sqdist(self, X) -> np.ndarray:
        """Squared Mahalanobis distances of the rows of X to the mean."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        Z = X - self.mean
        proj = Z @ self.U
        w = self.b * self.lam / (self.a + self.b * self.lam)
        d2 = ((Z ** 2).sum(axis=1) - (proj ** 2 * w).sum(axis=1)) / self.a
        return np.maximum(d2, 0.0)

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "a": self.a, "b": self.b, "shrinkage": self.shrinkage,
                "lam": self.lam.tolist(), "U": self.U.tolist(), "p": self.p}

    @classmethod
    def from_state(cls, st: dict) -> "ShrinkageGaussian":
        g = cls()
        g.mean = np.asarray(st["mean"], dtype=np.float64)
        g.a, g.b, g.shrinkage, g.p = float(st["a"]), float(st["b"]), float(st["shrinkage"]), int(st["p"])
        g.lam = np.asarray(st["lam"], dtype=np.float64)
        g.U = np.asarray(st["U"], dtype=np.float64).reshape(g.p, len(g.lam))
        return g


class SpectralSpike:
    """Spikes above the calibrated Marchenko–Pastur edge (the live detector's rule)."""

    name = "spectral_spike"

    def __init__(self, quantile: float = 0.99):
        self.quantile = quantile
        self.layers: dict[int, dict] = {}

    def fit(self, feats: list[dict]) -> "SpectralSpike":
        by_layer: dict[int, list] = {}
        for f in feats:
            for layer, wins in f["spectra"].items():
                by_layer.setdefault(int(layer), []).extend(wins)
        for layer, wins in sorted(by_layer.items()):
            sigma2 = float(np.median([w[3] for w in wins]))
            counts = [count_spikes(w[0], w[1], w[2], sigma2) for w in wins]
            thr = int(math.ceil(np.quantile(counts, self.quantile)))
            self.layers[layer] = {"sigma2": sigma2, "spike_threshold": thr, "frames": len(wins)}
        return self

    def score(self, feats: list[dict]) -> np.ndarray:
        out = np.empty(len(feats))
        for i, f in enumerate(feats):
            best = -math.inf
            for layer, wins in f["spectra"].items():
                cal = self.layers.get(int(layer))
                if cal is None:
                    continue
                for w in wins:
                    best = max(best, count_spikes(w[0], w[1], w[2], cal["sigma2"]) - cal["spike_threshold"])
            out[i] = best if best > -math.inf else 0.0
        return out

    def top_window(self, feat: dict) -> dict | None:
        """The text's window with the most spikes above its layer's calibrated edge
        (ties: the earliest), in the units count_spikes uses — for reports."""
        best, out = -1, None
        for layer, wins in sorted(feat["spectra"].items()):
            cal = self.layers.get(int(layer))
            if cal is None:
                continue
            for w in wins:
                k = count_spikes(w[0], w[1], w[2], cal["sigma2"])
                if k > best:
                    best = k
                    out = {"layer": int(layer), "token_count": int(w[4]) if len(w) > 4 else None,
                           "window": int(w[1]), "dim": int(w[2]), "sigma2": float(cal["sigma2"]),
                           "spikes": int(k), "spike_threshold": int(cal["spike_threshold"]),
                           "eigenvalues": [float(v) for v in w[0]]}
        return out

    def state(self) -> dict:
        return {"quantile": self.quantile, "layers": {str(k): v for k, v in self.layers.items()}}

    @classmethod
    def from_state(cls, st: dict) -> "SpectralSpike":
        d = cls(st["quantile"])
        d.layers = {int(k): v for k, v in st["layers"].items()}
        return d


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


class LLMCheckHidden:
    """Two-sided robust z of the LLM-Check hidden score: |s − median| / (1.4826·MAD)."""

    name = "llmcheck_hidden"

    def fit(self, feats: list[dict]) -> "LLMCheckHidden":
        s = np.array([f["llmcheck"] for f in feats], dtype=np.float64)
        self.median = float(np.median(s))
        mad = float(np.median(np.abs(s - self.median))) * 1.4826
        self.mad = mad if mad > 0 else (float(s.std()) or 1.0)
        return self

    def score(self, feats: list[dict]) -> np.ndarray:
        s = np.array([f["llmcheck"] for f in feats], dtype=np.float64)
        return np.abs(s - self.median) / self.mad

    def state(self) -> dict:
        return {"median": self.median, "mad": self.mad}

    @classmethod
    def from_state(cls, st: dict) -> "LLMCheckHidden":
        d = cls()
        d.median, d.mad = float(st["median"]), float(st["mad"])
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


DETECTORS = {c.name: c for c in (SpectralSpike, DescriptorMahalanobis, HiddenMahalanobis, LLMCheckHidden)}


class EigenTrack:
    """The recurrent risk model over descriptor sequences (an ONNX GRU, run
    with onnxruntime: monitor/risk.py). Score of a text = the largest logit over
    its steps (the live sidecar alerts on the same per-step risk = sigmoid(logit);
    the logit does not saturate in float32). The model is trained by `eigenwatch
    calibrate` (reference texts vs corrupted copies, monitor/corrupt.py) or by
    `eigenwatch train`, and travels inside CALIB.json as base64."""

    name = "eigentrack"

    def __init__(self, risk=None, blob: bytes | None = None):
        self.risk, self.blob = risk, blob

    @classmethod
    def from_onnx(cls, blob: bytes, where: str = "<embedded>") -> "EigenTrack":
        from eigenwatch.monitor.risk import RiskModel

        return cls(RiskModel.from_bytes(blob, where), blob)

    def fit(self, feats: list[dict]) -> "EigenTrack":
        return self  # trained separately (it needs positives); see monitor/train.py

    def step_risks(self, feats: list[dict]) -> list[np.ndarray]:
        """Per-step risk of each text: N × [T_i]."""
        return self.risk.sequences([f["sequence"] for f in feats])

    def score(self, feats: list[dict]) -> np.ndarray:
        logits = self.risk.sequences([f["sequence"] for f in feats], output="logit")
        return np.array([float(l.max()) if len(l) else 0.0 for l in logits])

    def state(self) -> dict:
        import base64

        return {"onnx_base64": base64.b64encode(self.blob).decode("ascii"), "sha256": self.risk.sha256,
                "model": self.risk.model, "layers": list(self.risk.layers)}

    @classmethod
    def from_state(cls, st: dict) -> "EigenTrack":
        import base64

        return cls.from_onnx(base64.b64decode(st["onnx_base64"]), "CALIB.json offline.detectors.eigentrack")


# Detectors that read the same per-window spectral descriptors, best first: the
# EigenTrack GRU reads every descriptor of every monitored layer over time,
# descriptor_mahalanobis their per-text mean, spectral_spike one of them.
DESCRIPTOR_FAMILY = ("eigentrack", "descriptor_mahalanobis", "spectral_spike")


def combined_voters(names) -> list[str]:
    """The detectors the combined score is made of: one per source of evidence.

    Every detector outside the descriptor family (pooled hidden states, token
    states, LLM-Check's covariance), and of the descriptor family only its
    first present member. With all three descriptor detectors voting, one
    source of evidence gets three chances to flag an ordinary text, and a
    shift only the hidden-state detectors see (a domain shift) is diluted by
    them. In bench/bench_detect.py (two data seeds, MiniLM and the tiny
    Llama), four voters instead of six raised the combined score's worst
    shift against the best baseline in all four runs and its mean in three
    (README). The other detectors are still fitted, scored and reported.
    """
    names = set(names)
    family = [k for k in DESCRIPTOR_FAMILY if k in names]
    return sorted((names - set(DESCRIPTOR_FAMILY)) | set(family[:1]))


def corruption_weights(clean: dict[str, np.ndarray], corrupted: dict[str, np.ndarray],
                       floor: float = 1e-4) -> tuple[dict[str, float], dict[str, float]]:
    """(weights, AUROCs) of the combined score's voters, from how well each
    tells calibration texts from corrupted copies of the same texts.

    w_j ∝ max(AUROC_j − ½, 0)² + floor. Both sets are texts no detector was
    fitted to (a GRU learns the corruption recipe on other texts), so the
    AUROC is out of sample. The square gives a detector near chance on this
    model almost no say (the hidden-state Mahalanobis of a random-weight
    model), where equal weights let its false alarms dilute the detectors
    that see something. Measured with bench/bench_detect.py on two data seeds
    and both models, against equal weights over the same four voters: the
    combined score's worst shift against the best baseline rose in all four
    runs (MiniLM −0.023 → −0.021 and −0.025 → −0.020; tiny −0.060 → −0.058
    and −0.165 → −0.100), and so did its mean (MiniLM +0.081 → +0.087 and
    +0.072 → +0.074; tiny −0.030 → −0.023 and −0.054 → −0.031).
    """
    aucs = {k: auroc(clean[k], corrupted[k]) for k in clean}
    return {k: max(a - 0.5, 0.0) ** 2 + floor for k, a in aucs.items()}, aucs


def conformal_p(ref, s) -> np.ndarray:
    """(1 + #{ref ≥ s}) / (n + 1) for each s: the empirical p-value of s among ref."""
    ref = np.sort(np.asarray(ref, dtype=np.float64))
    s = np.asarray(s, dtype=np.float64)
    ge = len(ref) - np.searchsorted(ref, s, side="left")
    return (1.0 + ge) / (len(ref) + 1.0)


class Combined:
    """One calibrated risk from several detectors: a harmonic-mean p-value, made conformal.

    Per detector j, a conformal p-value against its scores on calibration texts
    not used to fit it: p_j = (1 + #{ref_j ≥ s}) / (n + 1). Beyond the
    calibration's largest score the empirical p-value would be stuck at its
    floor 1/(n + 1) (ties among everything far out), so there it is continued
    by an exponential tail: p_j = (1 / (n + 1))·exp(−(s − max_j)/β_j), β_j the
    mean excess of the top m = max(5, tail_fraction·n) scores over the m-th
    largest. Inside the calibration range p_j stays the plain rank, which keeps
    the final p-value calibrated; the tail only orders the far-out texts.

    T = log Σ_j w_j/p_j, the weighted harmonic mean p-value (Wilson 2019) on a
    log scale; weights sum to 1 (equal unless given: `corruption_weights`).
    Why not Fisher's Σ −log p_j: on a shift only one detector sees (a domain
    shift the hidden-state Mahalanobis catches while the spectral detectors
    score it as *more* typical), Fisher's sum lets the others drown it; the
    harmonic mean is dominated by the smallest p-values, yet still adds up
    several moderate ones (measured in bench/bench_detect.py).

    T is made conformal once more: p = (1 + #{T_ref ≥ T}) / (n + 1), T_ref the
    statistics of the calibration texts, each computed leave-one-out against
    the other n − 1 — so whatever the correlation between detectors, p is
    (approximately: the tails are fitted on the same texts) uniform on
    in-distribution texts and `p < far` alerts at rate far.
    """

    name = "combined"

    def fit(self, cal_scores: dict[str, np.ndarray], tail_fraction: float = 0.1,
            weights: dict[str, float] | None = None) -> "Combined":
        self.names = sorted(cal_scores)
        self.ref = {k: np.asarray(cal_scores[k], dtype=np.float64) for k in self.names}
        sizes = {len(v) for v in self.ref.values()}
        if len(sizes) != 1 or min(sizes) < 2:
            raise ValueError("Combined.fit: every detector needs the same number (>= 2) of calibration scores")
        w = np.array([1.0 if weights is None else float(weights[k]) for k in self.names])
        if not (np.all(np.isfinite(w)) and np.all(w > 0)):
            raise ValueError(f"Combined.fit: weights must be finite and > 0, got {dict(zip(self.names, w))}")
        self.weights = {k: float(x) for k, x in zip(self.names, w / w.sum())}
        self._log_w = np.log(w / w.sum())
        self.n = sizes.pop()
        self.tail_fraction = float(tail_fraction)
        self.sorted = {k: np.sort(v) for k, v in self.ref.items()}
        m = min(self.n, max(5, int(self.tail_fraction * self.n)))
        self.tail = {}
        for k in self.names:
            r = self.sorted[k]
            t = r[self.n - m]
            beta = float((r[self.n - m:] - t).mean())
            if not beta > 0:  # discrete scores (spike counts): one unit of the score's spread
                beta = float(r.std()) or 1.0
            self.tail[k] = (float(t), beta, m)
        self.t_ref = self._statistic(self.ref, loo=True)
        return self

    def _u(self, k: str, s: np.ndarray, loo: bool) -> np.ndarray:
        """−log p_j of scores s of detector k; loo: s are the calibration scores themselves."""
        r = self.sorted[k]
        ge = self.n - np.searchsorted(r, s, side="left")
        if loo:  # a calibration text is compared with the other n − 1
            p = ge / float(self.n)
        else:
            p = (1.0 + ge) / (self.n + 1.0)
        # Beyond every score it is compared with, keep ordering the far-out texts.
        # A calibration text is compared with the other n − 1: the largest one
        # extends past the second largest, exactly as a new text past the largest.
        beta = self.tail[k][1]
        if loo:
            top, floor = r[-2], 1.0 / self.n
            beyond = (s > top) & (s >= r[-1])
        else:
            top, floor = r[-1], 1.0 / (self.n + 1.0)
            beyond = s > top
        p = np.where(beyond, floor * np.exp(-np.maximum(s - top, 0.0) / beta), p)
        return -np.log(np.clip(p, 1e-300, 1.0))

    def transform(self, scores: dict[str, np.ndarray], loo: bool = False) -> np.ndarray:
        """[m, k]: −log p_j of every text and detector (columns in self.names order)."""
        return np.stack([self._u(k, np.asarray(scores[k], dtype=np.float64), loo) for k in self.names], axis=1)

    def _statistic(self, scores, loo: bool = False) -> np.ndarray:
        Z = self.transform(scores, loo) + self._log_w  # [m, k]: log(w_j / p_j)
        top = Z.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(Z - top).sum(axis=1, keepdims=True)))[:, 0]  # log Σ_j w_j/p_j, stable

    def p_values(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        T = self._statistic(scores)
        ref = np.sort(self.t_ref)
        ge = len(ref) - np.searchsorted(ref, T - 1e-12, side="left")
        return (1.0 + ge) / (len(ref) + 1.0)

    def score(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        return -np.log10(self.p_values(scores))

    def state(self) -> dict:
        return {"statistic": "harmonic_mean_p", "calibration_scores": {k: v.tolist() for k, v in self.ref.items()},
                "tail_fraction": self.tail_fraction, "weights": dict(self.weights)}

    @classmethod
    def from_state(cls, st: dict) -> "Combined":
        return cls().fit({k: np.asarray(v) for k, v in st["calibration_scores"].items()},
                         float(st.get("tail_fraction", 0.1)), st.get("weights"))  # files before weights: equal


# Every detector a calibration file may hold (EigenTrack is trained, TokenMahalanobis fitted from
# token sums during extraction: neither from the per-text features alone).
ALL_DETECTORS = dict(DETECTORS, **{EigenTrack.name: EigenTrack, TokenMahalanobis.name: TokenMahalanobis})


def auroc(neg, pos) -> float:
    """P(pos > neg) + ½ P(tie): the area under the ROC curve (numpy only)."""
    neg, pos = np.asarray(neg, dtype=np.float64), np.asarray(pos, dtype=np.float64)
    allv = np.concatenate([neg, pos])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks over ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))
