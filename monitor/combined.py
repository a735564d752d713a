"""The combined score: one calibrated p-value from several detectors (numpy
only), and the helpers that choose and weight its voters; `auroc`.

Split conformal over one detector per source of evidence (`combined_voters`:
EigenTrack speaks for the descriptor family, unless token_probe, trained on the
same corrupted copies, tells them apart better). Each voter's p-value against its
scores on calibration texts not used to fit it (an exponential tail orders the
texts beyond the calibration maximum); the weighted harmonic mean of those
p-values, T = log Σ_j w_j/p_j, is made conformal once more against the
calibration texts' own T (leave-one-out): p = (#{T_ref ≥ T} + θ) / (n + 1),
θ ∈ [0, 1) the text's place between its neighbours (`conformal_p`), continued beyond the largest T_ref by the same kind of exponential tail.
score = −log10 p; alert when p < the chosen false-alarm rate.
"""

from __future__ import annotations

import numpy as np

# Detectors that read the same per-window spectral descriptors, best first: the
# EigenTrack GRU reads every descriptor of every monitored layer over time,
# descriptor_mahalanobis their per-text mean, spectral_spike one of them.
DESCRIPTOR_FAMILY = ("eigentrack", "descriptor_mahalanobis", "spectral_spike")


def combined_voters(names, corruption_auroc: dict[str, float] | None = None) -> list[str]:
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

    With `corruption_auroc` (each candidate's AUROC at telling calibration texts
    from their corrupted copies, all kinds together: `corruption_weights`), the
    GRU stands down when token_probe tells those copies apart better
    (SUPERVISED). Both learnt the same corrupted copies, and the GRU reads the
    spectral descriptors of windows of the token states the probe reads whole,
    so once the probe is the better of the two the GRU adds its false alarms
    and little evidence: on MiniLM the GRU scored licence paragraphs as *more*
    typical than the reference (0.42) while holding a quarter of the weight.
    Standing it down, recomputed from one run of bench/bench_detect.py (the
    main table and the four --transfer cells, all MiniLM, probe ahead in each):
    the worst shift against the best baseline rose in the three paragraph runs
    (main −0.024 → −0.010, A −0.013 → +0.000, B −0.025 → −0.012; licence text
    each time), stayed in the two sentence runs, and the vocabulary-keeping
    means rose by 0.001–0.008 (README). On the tiny random-weight Llama the two
    tie (0.578 / 0.574) and the GRU keeps its vote: it alone sees stuttered
    spans there. The descriptor family then has no voter: its other members
    cannot be computed live (sidecar/combined.py).
    """
    names = set(names)
    family = [k for k in DESCRIPTOR_FAMILY if k in names]
    out = (names - set(DESCRIPTOR_FAMILY)) | set(family[:1])
    probe, gru = SUPERVISED
    if corruption_auroc is not None and {probe, gru} <= out and corruption_auroc[probe] > corruption_auroc[gru]:
        out.discard(gru)
    return sorted(out)


# Detectors trained on the calibration's corrupted copies: the token probe and the EigenTrack GRU.
SUPERVISED = ("token_probe", "eigentrack")


MIN_TEXTS_PER_KIND = 10  # fewer corrupted copies of one kind and its AUROC is left out of the weights


def corruption_weights(clean: dict[str, np.ndarray], corrupted: dict[str, np.ndarray], kinds=None,
                       floor: float = 1e-4) -> tuple[dict[str, float], dict[str, float], dict[str, dict]]:
    """(weights, AUROCs, AUROCs per corruption kind) of the combined score's voters,
    from how well each tells calibration texts from corrupted copies of the same texts.

    w_j ∝ max(A_j − ½, 0)² + floor, A_j the voter's best AUROC: on all the copies,
    or on the copies of one kind (`kinds`, monitor/offline/texts.KINDS, one per
    copy; kinds with at least MIN_TEXTS_PER_KIND copies). Both sets are texts no
    detector was fitted to (a GRU learns the corruption recipe on other texts),
    so the AUROC is out of sample. The square gives a detector near chance on
    this model almost no say (the hidden-state Mahalanobis of a random-weight
    model), where equal weights let its false alarms dilute the detectors that
    see something (against equal weights, bench/bench_detect.py on two data
    seeds and both models: the worst shift against the best baseline rose in
    all four runs, MiniLM −0.023 → −0.021 and −0.025 → −0.020, tiny −0.060 →
    −0.058 and −0.165 → −0.100).

    Why the best kind and not the mix: the harmonic mean is dominated by the
    smallest p-values, so a specialist's evidence counts where it is strong. The
    Mahalanobis voters see letter noise at 0.95–0.98 and the mix at 0.63–0.68;
    weighted by the mix they had 0.25–0.3 of the say against token_probe's
    0.38–0.47, and domain shifts only they see (licence and foreign paragraphs)
    trailed the pooled Mahalanobis alone by up to 0.066 AUROC. Chosen on corpus A
    of bench/bench_detect.py --transfer (README), then measured on B.
    """
    aucs = {k: auroc(clean[k], corrupted[k]) for k in clean}
    by_kind: dict[str, dict] = {k: {} for k in clean}
    if kinds is not None:
        kinds = np.asarray(kinds)
        for kind in sorted(set(kinds.tolist())):
            sel = kinds == kind
            if sel.sum() >= MIN_TEXTS_PER_KIND:
                for k in clean:
                    by_kind[k][kind] = auroc(clean[k], np.asarray(corrupted[k])[sel])
    best = {k: max([aucs[k], *by_kind[k].values()]) for k in clean}
    return {k: max(a - 0.5, 0.0) ** 2 + floor for k, a in best.items()}, aucs, by_kind


def conformal_p(ref, s) -> np.ndarray:
    """The conformal p-value of each score s among the reference scores, made
    continuous between them: (#{ref ≥ s} + θ) / (n + 1), θ = (r_hi − s)/(r_hi − r_lo)
    ∈ [0, 1) where r_lo < s ≤ r_hi are s's neighbours among the sorted ref; 1 at or
    below the smallest, 1/(n + 1) at the largest (past it: the caller's tail).

    The plain rank (1 + #{ref ≥ s}) / (n + 1) gives every s between the same two
    reference scores the same p-value. A combined statistic far from most texts
    then ties whole groups of ordinary and shifted texts: in bench/bench_detect.py
    --transfer, corpus B paragraphs, word salad and code texts that two voters
    see at ≥ 0.999 tied with held-out texts at the second-largest calibration
    rank, and the combined score sat at 0.979 on both. θ replaces the tie by the
    text's place between its neighbours, so the p-value is strictly decreasing in
    the score. Calibration is kept: for exchangeable continuous scores
    P(p ≤ k/(n + 1)) = P(#{ref ≥ s} < k) = k/(n + 1) exactly at every rank (θ = 0
    only on a reference value), and between ranks the rate moves by less than
    1/(n + 1): θ stands in for the uniform draw of a randomised conformal p-value.
    """
    r = np.sort(np.asarray(ref, dtype=np.float64))
    return _smooth_p(r, np.asarray(s, dtype=np.float64), loo=False)


def _smooth_p(r: np.ndarray, s: np.ndarray, loo: bool) -> np.ndarray:
    """conformal_p against sorted r; loo: each s is itself one of r and is compared
    with the other n − 1 (its upper neighbour is the next value after it in r)."""
    n = len(r)
    i = np.searchsorted(r, s, side="left")  # #{r < s}
    m = n - 1 if loo else n  # how many it is compared with
    ge = m - i  # #{others ≥ s}
    hi_at = i + 1 if loo else i  # the first other ≥ s
    lo = r[np.clip(i - 1, 0, n - 1)]
    hi = r[np.clip(hi_at, 0, n - 1)]
    inside = (i > 0) & (hi_at < n) & (hi > lo)
    theta = np.where(inside, (hi - s) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    p = (ge + theta) / (m + 1.0)
    return np.clip(np.where(s < r[0], 1.0, p), 1.0 / (m + 1.0), 1.0)


class Combined:
    """One calibrated risk from several detectors: a harmonic-mean p-value, made conformal.

    Per detector j, a conformal p-value against its scores on calibration texts
    not used to fit it: p_j = (#{ref_j ≥ s} + θ) / (n + 1), continuous between
    the calibration scores (`conformal_p`: no ties between texts). Beyond the
    calibration's largest score the empirical p-value would be stuck at its
    floor 1/(n + 1) (ties among everything far out), so there it is continued
    by an exponential tail: p_j = (1 / (n + 1))·exp(−(s − max_j)/β_j), β_j the
    mean excess of the top m = max(5, tail_fraction·n) scores over the m-th
    largest. Inside the calibration range p_j stays the conformal rank, which
    keeps the final p-value calibrated; the tail only orders the far-out texts.

    T = log Σ_j w_j/p_j, the weighted harmonic mean p-value (Wilson 2019) on a
    log scale; weights sum to 1 (equal unless given: `corruption_weights`).
    Why not Fisher's Σ −log p_j: on a shift only one detector sees (a domain
    shift the hidden-state Mahalanobis catches while the spectral detectors
    score it as *more* typical), Fisher's sum lets the others drown it; the
    harmonic mean is dominated by the smallest p-values, yet still adds up
    several moderate ones (measured in bench/bench_detect.py).

    T is made conformal once more: p = (#{T_ref ≥ T} + θ) / (n + 1), T_ref the
    statistics of the calibration texts, each computed leave-one-out against
    the other n − 1 — so whatever the correlation between detectors, p is
    (approximately: the tails are fitted on the same texts) uniform on
    in-distribution texts and `p < far` alerts at rate far. Beyond the largest
    T_ref, p continues as (1 / (n + 1))·exp(−(T − max T_ref)/β_T), β_T the mean
    excess of the top m T_ref: without it every text past the calibration's
    extreme ties at 1/(n + 1), a held-out text just past it with a text far out
    (bench/bench_detect.py --transfer --quick, corpus A paragraphs: 6 of 150
    held-out texts at that floor tied with shifted ones, and the combined
    score's AUROC sat at 0.980 on shifts every strong voter scores at ≥ 0.987).
    Below 1/(n + 1) nothing changes an alert at any rate a calibration can
    support (far ≥ 1/(n + 1)); it only orders the far-out texts.
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
        t = np.sort(self.t_ref)
        top = t[self.n - m:]
        beta = float((top - top[0]).mean())
        self.t_beta = beta if beta > 0 else (float(t.std()) or 1.0)
        return self

    def _u(self, k: str, s: np.ndarray, loo: bool) -> np.ndarray:
        """−log p_j of scores s of detector k; loo: s are the calibration scores themselves."""
        r = self.sorted[k]
        p = _smooth_p(r, s, loo)  # a calibration text is compared with the other n − 1
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
        """[m, k]: −log p_j of every text and detector (columns in self.names order); a
        detector missing from `scores` counts as no evidence, p_j = 1 (a running value
        before every voter has spoken: sidecar/combined.py)."""
        m = len(next(iter(scores.values())))
        return np.stack([self._u(k, np.asarray(scores[k], dtype=np.float64), loo) if k in scores else np.zeros(m)
                         for k in self.names], axis=1)

    def _statistic(self, scores, loo: bool = False) -> np.ndarray:
        Z = self.transform(scores, loo) + self._log_w  # [m, k]: log(w_j / p_j)
        top = Z.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(Z - top).sum(axis=1, keepdims=True)))[:, 0]  # log Σ_j w_j/p_j, stable

    def p_values(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        T = self._statistic(scores)
        ref = np.sort(self.t_ref)
        p = _smooth_p(ref, T, loo=False)
        # past every calibration text: the tail (class docstring), continuous at the floor
        return np.where(T > ref[-1], np.exp(-np.maximum(T - ref[-1], 0.0) / self.t_beta) / (len(ref) + 1.0), p)

    def score(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        return -np.log10(self.p_values(scores))

    def state(self) -> dict:
        return {"statistic": "harmonic_mean_p", "calibration_scores": {k: v.tolist() for k, v in self.ref.items()},
                "tail_fraction": self.tail_fraction, "weights": dict(self.weights)}

    @classmethod
    def from_state(cls, st: dict) -> "Combined":
        return cls().fit({k: np.asarray(v) for k, v in st["calibration_scores"].items()},
                         float(st.get("tail_fraction", 0.1)), st.get("weights"))  # files before weights: equal


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
