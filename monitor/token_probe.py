"""token_probe: a self-supervised token-plausibility probe (numpy only), an
ELECTRA-style discriminator (Clark et al., 2020) trained at calibrate time on
nothing but the reference texts.

At the middle tapped layer (the one LLM-Check reads), an L2-regularised
logistic regression tells the token states of the fit texts (label 0) from
those of their corrupted copies (label 1; the generic recipe of
monitor/offline/texts.py that also trains the EigenTrack GRU: words dropped,
spans stuttered, digit noise, a span of another reference text inserted). A
text's value is its mean token logit. Contextual states of a token carry how
well it fits its neighbours, which word order and meaning change while the
vocabulary stays (bench/bench_detect.py --transfer: word_shuffle,
content_swap); the unsupervised token and pooled Gaussians barely see that.

The mean logit is the head applied to the mean state, w·(Σx/n) + b, so
scoring reads only the text's token sums: `score` works under either engine,
and the live tap computes it from the Σx it already keeps
(kernels/hidden_stats.LinearProbe, hooks/hidden.py). Fitting reads per-token
rows (monitor/tokenrows.py), which only `--engine hf` hands over.
"""

from __future__ import annotations

import numpy as np

from eigenwatch.kernels.hidden_stats import LinearProbe, middle_layer

from .tokenrows import rows_of

LAMBDA = 1.0  # L2 penalty on the standardised weights; AUROC was flat over 0.1–100 (README, token_probe)
MAX_NEWTON = 50


def fit_logistic(X, y, lam: float = LAMBDA, max_iter: int = MAX_NEWTON) -> tuple[np.ndarray, float]:
    """(w, b) minimising Σ_i log(1 + exp(−s_i(w·x_i + b))) + (lam/2)‖w‖², s_i = ±1 from
    y ∈ {0, 1}, the intercept unpenalised: Newton's method with step halving (the
    objective is strictly convex for lam > 0), float64. X [n, p], y [n]."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, p = X.shape
    Xa = np.hstack([X, np.ones((n, 1))])
    pen = np.full(p + 1, float(lam))
    pen[-1] = 0.0
    theta = np.zeros(p + 1)

    def objective(t):
        z = Xa @ t
        return float(np.logaddexp(0.0, z).sum() - y @ z + 0.5 * (pen * t * t).sum())

    f = objective(theta)
    for _ in range(max_iter):
        z = Xa @ theta
        q = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid, overflow-free
        grad = Xa.T @ (q - y) + pen * theta
        H = (Xa * (q * (1.0 - q))[:, None]).T @ Xa + np.diag(pen)
        H[-1, -1] += 1e-12 * n  # both classes' rows could all be identical
        step = np.linalg.solve(H, grad)
        t = 1.0
        while True:
            cand = theta - t * step
            fc = objective(cand)
            if fc <= f or t < 1e-10:
                break
            t *= 0.5
        theta, f_old, f = cand, f, fc
        if abs(f_old - f) <= 1e-12 * max(1.0, abs(f)):
            break
    return theta[:-1], float(theta[-1])


class TokenProbe:
    name = "token_probe"

    def fit(self, ref_feats: list[dict], corrupted_feats: list[dict], layers) -> "TokenProbe":
        """ref_feats: the fit texts' features, corrupted_feats: their corrupted copies' (both with
        per-token rows); layers: the tapped layers (the probe reads the middle one)."""
        layer = middle_layer(layers)
        R = np.concatenate([r[layer] for r in rows_of(ref_feats, self.name)]).astype(np.float64)
        N = np.concatenate([r[layer] for r in rows_of(corrupted_feats, self.name)]).astype(np.float64)
        if len(R) < 2 or len(N) < 2:
            raise ValueError(f"{self.name}: needs at least 2 reference and 2 corrupted rows, got {len(R)} and {len(N)}")
        # Standardised by the reference rows, so one penalty suits every coordinate; folded back
        # into w and b below, so scoring needs the raw mean state only.
        mu = R.mean(axis=0)
        sd = R.std(axis=0)
        sd = np.where(sd > 1e-12 * (np.abs(mu) + 1.0), sd, 1.0)
        X = (np.concatenate([R, N]) - mu) / sd
        y = np.concatenate([np.zeros(len(R)), np.ones(len(N))])
        w, b = fit_logistic(X, y)
        w = w / sd
        self.probe = LinearProbe(layer, w, b - float(w @ mu))
        self.n_rows = (len(R), len(N))
        return self

    def score(self, feats: list[dict]) -> np.ndarray:
        """Mean token logit of each text, from its mean state at the probe's layer."""
        layer = self.probe.layer
        out = np.empty(len(feats))
        for i, f in enumerate(feats):
            pooled = f.get("pooled", {})
            if layer not in pooled:
                raise ValueError(f"{self.name}: the text has no rows of layer {layer}; score with the tap "
                                 "settings of the calibration")
            out[i] = self.probe.mean_logit(pooled[layer])
        return out

    def state(self) -> dict:
        return self.probe.state()

    @classmethod
    def from_state(cls, st: dict) -> "TokenProbe":
        d = cls()
        d.probe = LinearProbe.from_state(st, f"offline.detectors.{cls.name}")
        return d
