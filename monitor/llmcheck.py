"""LLM-Check's hidden score (Sriramanan et al., 2024) and its detector (numpy only).

At the middle tapped layer (tapped layers sorted, index len//2), Z = H − mean
over tokens of the text's T×d hidden-state matrix H, σ_i its singular values
(i = 1..min(T, d)), and

    score = mean_i ½·log(σ_i² + 1e-3)

the mean log singular value with a 1e-3 ridge on σ². Computed from the
text's token sums (n, Σx, XᵀX; hooks/capture.py), which both engines capture
alike: the centred scatter C = XᵀX − n·μμᵀ (μ = Σx/n) is ZᵀZ, whose top
min(n, d) eigenvalues are the σ_i². (Z has rank ≤ T − 1, so for T ≤ d one term
is ½·log 1e-3, the same for every text of that length.) The detector: the
two-sided robust deviation |s − median| / (1.4826·MAD) from the reference.
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-3
NAME = "llmcheck_hidden"


def middle_layer(layers) -> int:
    """The layer whose hidden states LLM-Check reads: the middle tapped one."""
    layers = sorted(layers)
    return layers[len(layers) // 2]


def llmcheck_scatter(count: int, total, scatter, ridge: float = RIDGE) -> float:
    """The score from (n, Σx [d], XᵀX [d, d]) of the text's hidden states.

    Through one Cholesky factorisation, not an eigensolve (≈ 4× less work at
    d = 384, where the eigensolve was a quarter of `score`'s time): with
    m = min(n, d), the centred scatter has rank ≤ m, so all but its top m
    eigenvalues are 0 and log det(C + ridge·I) = Σ_top-m log(λ_i + ridge) +
    (d − m)·log(ridge). The score is then (log det − (d − m)·log ridge) / 2m.
    Falls back to the eigensolve when C + ridge·I is not numerically positive
    definite (NaN input, a scatter not from real rows)."""
    mu = np.asarray(total, dtype=np.float64) / count
    c = np.asarray(scatter, dtype=np.float64) - count * np.outer(mu, mu)  # Zᵀ Z
    c = 0.5 * (c + c.T)
    d = c.shape[0]
    m = min(count, d)
    try:
        chol = np.linalg.cholesky(c + ridge * np.eye(d))
    except np.linalg.LinAlgError:
        lam = np.linalg.eigvalsh(c)[::-1][:m]  # σ_i², descending
        return float(np.mean(0.5 * np.log(np.maximum(lam, 0.0) + ridge)))
    logdet = 2.0 * float(np.sum(np.log(np.diagonal(chol))))
    return (logdet - (d - m) * np.log(ridge)) / (2.0 * m)


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
