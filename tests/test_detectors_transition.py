"""layer_transition (monitor/transition.py): how tokens move from one tapped
layer to the next. It separates texts whose later-layer states follow another
mapping from the earlier ones than the reference's (the same per-layer
marginals: what a detector of single layers cannot see), its state survives a
JSON round trip, and damaged state gives an error that names the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eigenwatch.monitor.combined import auroc
from eigenwatch.monitor.transition import LayerTransition

D = 16


def _texts(rng, n, M, noise=0.1):
    """Layer 1 rows ~ N(0, I); layer 3 rows = layer 1 rows @ M + noise (M orthogonal: same marginal)."""
    out = []
    for _ in range(n):
        t = rng.integers(8, 20)
        a = rng.standard_normal((t, D))
        b = a @ M + noise * rng.standard_normal((t, D))
        out.append({"token_rows": {1: a.astype(np.float16), 3: b.astype(np.float16)}})
    return out


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    M = np.linalg.qr(rng.standard_normal((D, D)))[0]
    M2 = np.linalg.qr(rng.standard_normal((D, D)))[0]  # another rotation: each layer alone looks the same
    return _texts(rng, 80, M), _texts(rng, 40, M), _texts(rng, 40, M2)


def test_separates_a_changed_layer_to_layer_mapping(data):
    fit, held, shifted = data
    det = LayerTransition().fit(fit)
    assert auroc(det.score(held), det.score(shifted)) > 0.95
    # each layer alone is the same standard normal: the mean squared norm per layer does not tell them apart
    def norms(fs, layer):
        return [float((f["token_rows"][layer].astype(np.float64) ** 2).sum(1).mean()) for f in fs]

    assert all(abs(auroc(norms(held, l), norms(shifted, l)) - 0.5) < 0.25 for l in (1, 3))


def test_texts_without_rows_say_which_engine_gives_them(data):
    det = LayerTransition().fit(data[0])
    with pytest.raises(ValueError, match="--engine hf"):
        det.score([{"pooled": {}}])


def test_state_round_trips_through_json(data):
    fit, held, shifted = data
    det = LayerTransition().fit(fit)
    back = LayerTransition.from_state(json.loads(json.dumps(det.state())))
    np.testing.assert_allclose(back.score(held + shifted), det.score(held + shifted), rtol=1e-5)


def test_needs_two_layers(data):
    with pytest.raises(ValueError, match="two tapped layers"):
        LayerTransition().fit([{"token_rows": {1: f["token_rows"][1]}} for f in data[0]])


@pytest.mark.parametrize("mutate, field", [
    (lambda st: st.update(pairs=[]), r"offline\.detectors\.layer_transition\.pairs"),
    (lambda st: st["pairs"][0].pop("W"), r"offline\.detectors\.layer_transition\.pairs\[0\]\.W is missing"),
    (lambda st: st["pairs"][0].update({"from": 3, "to": 1}), r"pairs\[0\]: expected layer numbers from < to"),
    (lambda st: st["pairs"][0]["W"].update(shape=[2, 2]), r"pairs\[0\]\.W"),
    (lambda st: st["pairs"][0]["gauss"].pop("mean"), r"pairs\[0\]\.gauss: damaged"),
])
def test_bad_state_names_the_field(data, mutate, field):
    st = json.loads(json.dumps(LayerTransition().fit(data[0]).state()))
    mutate(st)
    with pytest.raises(ValueError, match=field):
        LayerTransition.from_state(st)


def test_keep_rows_bounds_and_spreads_the_rows():
    from eigenwatch.monitor.tokenrows import keep_rows

    rows = {1: np.arange(200 * 4, dtype=np.float32).reshape(200, 4)}
    kept = keep_rows(rows, max_rows=10)[1]
    assert kept.shape == (10, 4) and kept.dtype == np.float16
    assert kept[0, 0] == 0 and kept[-1, 0] == rows[1][-1, 0]  # first and last token kept, evenly spaced between
