"""token_probe: a self-supervised token-plausibility probe (numpy only), an
ELECTRA-style discriminator (Clark et al., 2020) trained at calibrate time on
nothing but the reference texts.

At the middle tapped layer (the one LLM-Check reads), a linear discriminant
tells the token states of the fit texts (class 0) from those of their
corrupted copies (class 1; the generic recipe of monitor/offline/texts.py that
also trains the EigenTrack GRU: words dropped, spans stuttered, digit noise, a
span of another reference text inserted). A text's value is its mean token
logit. Contextual states of a token carry how well it fits its neighbours,
which word order and meaning change while the vocabulary stays
(bench/bench_detect.py --transfer: word_shuffle, content_swap); the
unsupervised token and pooled Gaussians barely see that.

The discriminant is fitted from each class's token sums (n, Σx, XᵀX), which
both engines hand over during extraction (the same sums token_mahalanobis is
fitted from), so `calibrate` fits it under either engine and both give the
same head. It replaced an L2 logistic regression on per-token rows (hf only):
on cached MiniLM token states of the transfer benchmark, vocabulary-keeping
mean AUROC 0.960 / 0.952 (corpus A sentences / paragraphs) and 0.958 / 0.900
(B) against the logistic head's 0.961 / 0.957 and 0.959 / 0.900 (README).

The mean logit is the head applied to the mean state, w·(Σx/n) + b, so
scoring reads only the text's token sums as well, and the live tap computes it
from the Σx it already keeps (kernels/hidden_stats.LinearProbe, hooks/hidden.py).
"""

from __future__ import annotations

import numpy as np

from eigenwatch.kernels.hidden_stats import LinearProbe, middle_layer

# Fraction of the standardised within-class covariance moved to its mean eigenvalue (a scaled
# identity). Among 0.001–0.3 on corpus A of the transfer benchmark, 0.01 and below were best on
# paragraphs (0.952; 0.928 at 0.3) and all within 0.002 on sentences.
SHRINK = 0.01


def fit_lda(ref, cor, shrink: float = SHRINK) -> tuple[np.ndarray, float]:
    """(w, b) of the linear discriminant of two classes of rows given by their sums
    ref = (n0, Σx [p], XᵀX [p, p]) and cor = (n1, …), float64: in coordinates
    standardised by class 0's per-coordinate s.d., w_s = S⁻¹(μ1 − μ0) with S the
    pooled within-class covariance shrunk toward (tr S / p)·I by `shrink`; w = w_s / s.d.
    b = −w·(μ0 + μ1)/2 + log(n1/n0): the log-odds of class 1 if both were Gaussians with
    that covariance."""
    (n0, t0, s0), (n1, t1, s1) = ref, cor
    if n0 < 2 or n1 < 2:
        raise ValueError(f"fit_lda: needs at least 2 rows of each class, got {n0} and {n1}")
    mu0, mu1 = np.asarray(t0, np.float64) / n0, np.asarray(t1, np.float64) / n1
    c0 = np.asarray(s0, np.float64) / n0 - np.outer(mu0, mu0)  # [p, p] covariance (1/n)
    c1 = np.asarray(s1, np.float64) / n1 - np.outer(mu1, mu1)
    sd = np.sqrt(np.maximum(np.diag(c0), 0.0))
    sd = np.where(sd > 1e-12 * (np.abs(mu0) + 1.0), sd, 1.0)  # a constant coordinate: left unscaled
    S = (n0 * c0 + n1 * c1) / (n0 + n1) / np.outer(sd, sd)
    p = len(sd)
    S = (1.0 - shrink) * S + shrink * (np.trace(S) / p) * np.eye(p)
    w = np.linalg.solve(0.5 * (S + S.T), (mu1 - mu0) / sd) / sd
    return w, float(-w @ (mu0 + mu1) / 2.0 + np.log(n1 / n0))


class TokenProbe:
    name = "token_probe"

    def fit(self, ref_sums: dict, cor_sums: dict, layers) -> "TokenProbe":
        """ref_sums / cor_sums: {layer: (n, Σx, XᵀX)} over every token of the fit texts and of
        their corrupted copies (monitor/mahalanobis.TokenMoments.sums); layers: the tapped
        layers (the probe reads the middle one)."""
        layer = middle_layer(layers)
        if layer not in ref_sums or layer not in cor_sums:
            raise ValueError(f"{self.name}: no token sums of layer {layer} (the tapped layers are "
                             f"{list(layers)}); extract the texts with the calibration's tap settings")
        w, b = fit_lda(ref_sums[layer], cor_sums[layer])
        self.probe = LinearProbe(layer, w, b)
        self.n_rows = (int(ref_sums[layer][0]), int(cor_sums[layer][0]))
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
