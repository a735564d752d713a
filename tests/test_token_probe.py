"""token_probe (monitor/token_probe.py, kernels/hidden_stats.LinearProbe): the
linear discriminant from token sums against a float64 reference computed from
the rows on awkward shapes, the mean token logit from the text's mean state
against the mean of per-token logits, that a probe trained only on reference
texts and their corrupted copies tells texts whose tokens moved the same way
from held-out ones, and the calibration-file state (round trip, errors naming
the field). The real `calibrate` fits it under both engines alike:
tests/test_engines.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eigenwatch.kernels.hidden_stats import LinearProbe
from eigenwatch.monitor.combined import auroc
from eigenwatch.monitor.mahalanobis import TokenMoments
from eigenwatch.monitor.offline.calibrate import ALL_DETECTORS
from eigenwatch.monitor.token_probe import SHRINK, TokenProbe, fit_lda

LAYERS = (1, 3, 4)  # the probe reads the middle one, 3


def _sums(X):
    X = np.asarray(X, dtype=np.float64)
    return len(X), X.sum(0), X.T @ X


def _reference_lda(X0, X1, shrink):
    """float64 reference from the rows themselves: np.cov of the standardised rows of each class."""
    mu0, sd = X0.mean(0), X0.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    Z0, Z1 = (X0 - mu0) / sd, (X1 - mu0) / sd
    n0, n1 = len(Z0), len(Z1)
    S = (np.cov(Z0.T, bias=True) * n0 + np.cov(Z1.T, bias=True) * n1).reshape(X0.shape[1], -1) / (n0 + n1)
    S = (1 - shrink) * S + shrink * np.trace(S) / len(S) * np.eye(len(S))
    w = np.linalg.solve(S, Z1.mean(0) - Z0.mean(0)) / sd
    return w, -w @ (X0.mean(0) + X1.mean(0)) / 2 + np.log(n1 / n0)


@pytest.mark.parametrize("n0, n1, p, shrink", [(2, 2, 1, SHRINK), (7, 3, 1, 0.1), (31, 40, 5, SHRINK),
                                               (101, 57, 13, 0.3), (30, 20, 40, SHRINK), (500, 700, 64, 0.001)])
def test_lda_from_token_sums_matches_the_float64_reference_from_rows(n0, n1, p, shrink):
    # fewer rows than coordinates (30 + 20 < 40: only the shrinkage makes S invertible), scales
    # spanning 20×, a large common offset (sums of raw rows, centred only inside the fit)
    rng = np.random.default_rng(n0 * 1000 + p)
    scale = rng.uniform(0.2, 4.0, p)
    X0 = rng.standard_normal((n0, p)) * scale + 50.0
    X1 = rng.standard_normal((n1, p)) * scale * 1.3 + 50.0 + 0.7
    w, b = fit_lda(_sums(X0), _sums(X1), shrink)
    w_ref, b_ref = _reference_lda(X0, X1, shrink)
    np.testing.assert_allclose(w, w_ref, rtol=1e-6, atol=1e-9 * np.abs(w_ref).max())
    assert b == pytest.approx(b_ref, rel=1e-6, abs=1e-6)


def test_a_constant_coordinate_or_a_single_row_is_refused_or_harmless():
    X0 = np.c_[np.random.default_rng(0).standard_normal((20, 3)), np.full(20, 7.0)]  # last coordinate constant
    X1 = X0[:10] + 0.5
    w, b = fit_lda(_sums(X0), _sums(X1))
    assert np.isfinite(w).all() and np.isfinite(b) and (X1 @ w + b).mean() > (X0 @ w + b).mean()
    with pytest.raises(ValueError, match="at least 2 rows of each class"):
        fit_lda(_sums(X0[:1]), _sums(X1))


@pytest.mark.parametrize("n, p", [(1, 1), (2, 7), (13, 384), (64, 17)])
def test_mean_logit_from_the_mean_state_is_the_mean_token_logit(n, p):
    rng = np.random.default_rng(n + p)
    X = rng.standard_normal((n, p)).astype(np.float32) * 3 + 1
    probe = LinearProbe(3, rng.standard_normal(p), -0.4)
    ref = float(np.mean(X.astype(np.float64) @ probe.w + probe.b))  # float64, per token
    assert probe.mean_logit(X.astype(np.float64).sum(0) / n) == pytest.approx(ref, rel=1e-12, abs=1e-12)


def _feats(rng, n_texts, p, shift=None):
    """Per text: kept rows per tapped layer and the mean state, as features.py gives them. Every
    token is a noisy copy of a shared direction scaled per text; `shift` moves the middle layer's
    tokens (what a corruption does to context) without changing the other layers."""
    out = []
    for _ in range(n_texts):
        m = int(rng.integers(3, 30))
        rows = {l: (rng.standard_normal((m, p)) + l).astype(np.float16) for l in LAYERS}
        if shift is not None:
            rows[3] = (rows[3].astype(np.float64) + shift * rng.uniform(0.5, 1.5, (m, 1))).astype(np.float16)
        out.append({"token_rows": rows, "pooled": {l: r.astype(np.float64).mean(0) for l, r in rows.items()}})
    return out


def _moments(feats):
    """{layer: (n, Σx, XᵀX)} over every token of the texts, as the extraction accumulates them."""
    acc = TokenMoments()
    for f in feats:
        for l, rows in f["token_rows"].items():
            acc.observe(l, *_sums(rows))
    return acc.sums


def test_probe_trained_on_corrupted_copies_flags_texts_whose_tokens_moved_alike():
    rng = np.random.default_rng(0)
    p = 20
    direction = rng.standard_normal(p) / np.sqrt(p)
    probe = TokenProbe().fit(_moments(_feats(rng, 60, p)), _moments(_feats(rng, 60, p, shift=1.2 * direction)),
                             LAYERS)
    assert probe.probe.layer == 3
    held = probe.score(_feats(rng, 80, p))
    shifted = probe.score(_feats(rng, 80, p, shift=direction))  # weaker than trained on
    assert auroc(held, shifted) > 0.9
    # a shift it was not trained on, orthogonal to the corruption's, is not what it detects
    other = rng.standard_normal(p)
    other -= (other @ direction) / (direction @ direction) * direction
    assert auroc(held, probe.score(_feats(rng, 80, p, shift=other / np.linalg.norm(other)))) < 0.75


def test_state_round_trips_through_json_and_damage_names_the_field():
    rng = np.random.default_rng(1)
    probe = TokenProbe().fit(_moments(_feats(rng, 10, 6)), _moments(_feats(rng, 10, 6, shift=np.ones(6))), LAYERS)
    again = ALL_DETECTORS["token_probe"].from_state(json.loads(json.dumps(probe.state())))
    feats = _feats(rng, 5, 6)
    np.testing.assert_array_equal(again.score(feats), probe.score(feats))  # float64 exact through JSON
    for key, bad, needle in (("w", [1.0, float("nan")], "NaN"), ("w", "x", r"token_probe\.w"),
                             ("layer", True, r"token_probe\.layer"), ("b", None, r"token_probe\.b")):
        st = probe.state()
        st[key] = bad
        with pytest.raises(ValueError, match=needle):
            TokenProbe.from_state(st)
    st = probe.state()
    del st["b"]
    with pytest.raises(ValueError, match=r"offline\.detectors\.token_probe\.b is missing"):
        TokenProbe.from_state(st)
    with pytest.raises(ValueError, match="rows of layer 3"):
        probe.score([{"pooled": {1: np.zeros(6)}}])
    with pytest.raises(ValueError, match=r"no token sums of layer 3 \(the tapped layers are \[1, 3, 4\]\)"):
        TokenProbe().fit({1: _sums(np.eye(6))}, {1: _sums(np.eye(6))}, LAYERS)


def test_the_wire_carries_the_probe_logit_only_where_the_tap_computed_one():
    from eigenwatch.hooks.frames import hidden_stats

    msg = hidden_stats((12, 1.0, 2.0, None, "abc", -0.25))
    assert msg.HasField("probe_logit") and msg.probe_logit == -0.25
    for values in ((12, 1.0, 2.0, 0.5, "abc", None), (12, 1.0, 2.0, 0.5, "abc")):  # other layers; older taps
        assert not hidden_stats(values).HasField("probe_logit")
