"""LLM-Check's hidden score (Sriramanan et al., 2024) and its detector (numpy only).

At the middle tapped layer (tapped layers sorted, index len//2), Z = H − mean
over tokens of the T×d matrix H of the text's first T ≤ 256 hidden states
(kernels/hidden_stats.LLMCHECK_ROWS: what the live tap can keep per request),
σ_i its singular values (i = 1..min(T, d)), and

    score = mean_i ½·log(σ_i² + 1e-3)

the mean log singular value with a 1e-3 ridge on σ². Both engines capture
those rows alike (hooks/capture.py), and so does the live tap: through the
T × T Gram Z Zᵀ while T ≤ d (its eigenvalues are the σ_i²), else the centred
scatter ZᵀZ. (Z has rank ≤ T − 1, so for T ≤ d one term is ½·log 1e-3, the
same for every text of that length.) The detector: the two-sided robust
deviation |s − median| / (1.4826·MAD) from the reference. The score itself is
computed in kernels/hidden_stats.py, which the live tap shares (re-exported
here).
"""

from __future__ import annotations

import numpy as np

from eigenwatch.kernels.hidden_stats import RIDGE, llmcheck_rows, llmcheck_scatter, middle_layer  # noqa: F401

NAME = "llmcheck_hidden"


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
