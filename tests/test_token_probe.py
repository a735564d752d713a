"""token_probe (monitor/token_probe.py, kernels/hidden_stats.LinearProbe): the
logistic regression against a float64 reference on awkward shapes, the mean
token logit from the text's mean state against the mean of per-token logits,
that a probe trained only on reference texts and their corrupted copies tells
texts whose tokens moved the same way from held-out ones, the calibration-file
state (round trip, errors naming the field), and `score` through the real
`calibrate` on MiniLM."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize

from eigenwatch.kernels.hidden_stats import LinearProbe
from eigenwatch.monitor.combined import auroc
from eigenwatch.monitor.offline.calibrate import ALL_DETECTORS
from eigenwatch.monitor.token_probe import TokenProbe, fit_logistic

LAYERS = (1, 3, 4)  # the probe reads the middle one, 3


def _reference_fit(X, y, lam):
    """float64 reference: the same objective minimised by scipy's BFGS from zero."""
    Xa = np.hstack([X, np.ones((len(X), 1))])
    pen = np.r_[np.full(X.shape[1], lam), 0.0]

    def f(t):
        z = Xa @ t
        return np.logaddexp(0.0, z).sum() - y @ z + 0.5 * (pen * t * t).sum()

    def g(t):
        return Xa.T @ (1.0 / (1.0 + np.exp(-(Xa @ t))) - y) + pen * t

    t = minimize(f, np.zeros(X.shape[1] + 1), jac=g, method="BFGS", options={"gtol": 1e-11, "maxiter": 10000}).x
    return t[:-1], t[-1]


@pytest.mark.parametrize("n, p, lam", [(2, 1, 1.0), (7, 1, 0.1), (31, 5, 1.0), (101, 13, 3.0), (97, 40, 1.0)])
def test_logistic_fit_matches_the_float64_reference(n, p, lam):
    rng = np.random.default_rng(n * 100 + p)
    X = rng.standard_normal((n, p)) * rng.uniform(0.2, 4.0, p)
    y = (rng.random(n) < 0.5).astype(float)
    y[0], y[-1] = 0.0, 1.0  # both classes present
    X[y == 1] += 0.7  # some signal, not separable for small lam... nor required to be
    w, b = fit_logistic(X, y, lam)
    w_ref, b_ref = _reference_fit(X, y, lam)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)
    assert b == pytest.approx(b_ref, rel=1e-5, abs=1e-6)


def test_separable_classes_still_give_finite_weights():
    X = np.r_[np.zeros((5, 3)), np.ones((5, 3))]
    y = np.r_[np.zeros(5), np.ones(5)]
    w, b = fit_logistic(X, y, 1e-3)
    assert np.isfinite(w).all() and np.isfinite(b) and (X[5:] @ w + b > X[:5] @ w + b).all()


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


def test_probe_trained_on_corrupted_copies_flags_texts_whose_tokens_moved_alike():
    rng = np.random.default_rng(0)
    p = 20
    direction = rng.standard_normal(p) / np.sqrt(p)
    probe = TokenProbe().fit(_feats(rng, 60, p), _feats(rng, 60, p, shift=1.2 * direction), LAYERS)
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
    probe = TokenProbe().fit(_feats(rng, 10, 6), _feats(rng, 10, 6, shift=np.ones(6)), LAYERS)
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
    with pytest.raises(ValueError, match="--engine hf"):
        TokenProbe().fit([{"pooled": {}}], [{"pooled": {}}], LAYERS)


def test_the_wire_carries_the_probe_logit_only_where_the_tap_computed_one():
    from eigenwatch.hooks.frames import hidden_stats

    msg = hidden_stats((12, 1.0, 2.0, None, "abc", -0.25))
    assert msg.HasField("probe_logit") and msg.probe_logit == -0.25
    for values in ((12, 1.0, 2.0, 0.5, "abc", None), (12, 1.0, 2.0, 0.5, "abc")):  # other layers; older taps
        assert not hidden_stats(values).HasField("probe_logit")
