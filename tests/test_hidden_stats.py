"""The tap's hidden-state statistics (hooks/hidden.py, kernels/hidden_stats.py)
equal what the offline detectors compute from the same rows' token sums, on
awkward shapes: requests interleaved as prefill chunks and decode rows,
shorter and longer than the width (the LLM-Check state switches from rows to
the scatter), untracked requests between them, a preempted request."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eigenwatch.hooks.hidden import HiddenStatsTap, load_hidden_calibration
from eigenwatch.hooks.windows import FrameSeed, hidden_values
from eigenwatch.kernels.hidden_stats import (LinearProbe, LowRankGaussian, RowSqdist, calibration_id,
                                             llmcheck_rows, llmcheck_scatter)
from eigenwatch.monitor.llmcheck import LLMCheckHidden
from eigenwatch.monitor.mahalanobis import ShrinkageGaussian
from eigenwatch.monitor.token_probe import TokenProbe

LAYERS = (1, 3, 4)
P = 24
TOKEN_RTOL = 1e-6  # the tap's token d² runs its bulk projections in float32 (kernels/hidden_stats.RowSqdist)
# The pooled distance and the probe read Σ(x − centre), each step's rows summed per request
# in float32 before the float64 sums (hooks/hidden.py): ~7 digits of Σx/n − m.
SUM_RTOL = 1e-6


def _calibration(tmp_path, rng, layers=LAYERS, p=P, window=8, stride=4):
    ref = {l: rng.standard_normal((300, p)) * np.linspace(0.5, 3.0, p) + l for l in layers}
    token = {l: ShrinkageGaussian.from_moments(len(x), x.sum(0), x.T @ x) for l, x in ref.items()}
    pooled = {l: ShrinkageGaussian().fit(x[:40] + 0.1 * rng.standard_normal((40, p))) for l, x in ref.items()}
    dets = {"token_mahalanobis": {"layers": {str(l): g.state() for l, g in token.items()}},
            "hidden_mahalanobis": {"layers": {str(l): g.state() for l, g in pooled.items()}},
            "llmcheck_hidden": LLMCheckHidden().fit([{"llmcheck": v} for v in rng.standard_normal(20)]).state(),
            "token_probe": LinearProbe(3, rng.standard_normal(p), 0.3).state()}
    path = tmp_path / "CALIB.json"
    path.write_text(json.dumps({"offline": {"layers": list(layers), "window": window, "stride": stride,
                                            "detectors": dets}}))
    return str(path), token, pooled, dets


def _offline(rows: np.ndarray, token, pooled, layer, mid, probe=None):
    """What `eigenwatch score` computes for one layer from the text's token sums."""
    n = len(rows)
    tot, scat = rows.sum(0), rows.T @ rows
    t = token[layer].mean_sqdist_moments(n, tot, scat) / token[layer].p
    g = pooled[layer]
    pl = float(g.sqdist((tot / n)[None])[0]) / g.p
    llm = llmcheck_scatter(n, tot, scat) if layer == mid else None
    logit = None
    if probe is not None and layer == probe.probe.layer:
        logit = float(probe.score([{"pooled": {layer: tot / n}}])[0])
    return n, t, pl, llm, logit


def test_live_statistics_equal_the_offline_detectors(tmp_path):
    rng = np.random.default_rng(0)
    path, token, pooled, dets = _calibration(tmp_path, rng)
    cal = load_hidden_calibration(path, LAYERS, 8, 4)
    assert cal.llm_layer == 3 and cal.id == calibration_id(dets)
    tap = HiddenStatsTap(cal, max_requests=3)
    # Requests: a (short, 5 rows < p), b (long, 40 rows > p: rows then scatter), c (untracked
    # by the limit: max_requests 3 with d taking the third slot), d (preempted, then gone).
    lengths = {"a": 5, "b": 40, "d": 7, "c": 6}
    seen = {k: {l: [] for l in LAYERS} for k in lengths}
    pos = dict.fromkeys(lengths, 0)
    schedule = [[("a", 3), ("b", 10), ("d", 4)], [("a", 2), ("b", 1), ("d", 3), ("c", 6)]] + \
        [[("b", 1)]] * 9 + [[("b", 20)]]
    pending = []
    for step, plan in enumerate(schedule):
        items, n_rows, parts = [], 0, []
        for rid, m in plan:
            items.append((rid, n_rows, n_rows + m))
            n_rows += m + 1  # one row of another (unmonitored) request between each
        rows = {}
        for l in LAYERS:
            x = rng.standard_normal((n_rows, P)) * 2 + l
            rows[l] = torch.from_numpy(x).float()
            for rid, lo, hi in items:
                seen[rid][l].append(rows[l][lo:hi].double().numpy())
        tap.add_step(rows, items)
        if step == 1:
            tap.drop("d")  # preempted: forgotten
    assert tap.untracked >= 1  # c found every slot taken
    for rid in ("a", "b"):
        pending += [FrameSeed(rid, rid, l, 0, lengths[rid], 0, True, torch.zeros(2, 2), 2, P, 1.0) for l in LAYERS]
    assert tap.before_step(["a", "b", "c"], pending) == 0
    for seed, got in zip(pending, hidden_values(pending)):  # all at once, as the exporter asks
        want = _offline(np.concatenate(seen[seed.request_id][seed.layer]), token, pooled, seed.layer, cal.llm_layer,
                        TokenProbe.from_state(dets["token_probe"]))
        assert got[0] == want[0] and got[4] == cal.id
        # token_probe: the mean token logit at its layer (3) only, as `score` gets it from the token sums
        assert (got[5] is None) == (want[4] is None) == (seed.layer != 3)
        if want[4] is not None:
            assert got[5] == pytest.approx(want[4], rel=SUM_RTOL, abs=SUM_RTOL)
        # token d² through float32 projections (RowSqdist), the pooled state's from Σ(x − centre)
        assert got[1] == pytest.approx(want[1], rel=TOKEN_RTOL) and got[2] == pytest.approx(want[2], rel=SUM_RTOL)
        if seed.layer == cal.llm_layer:
            assert got[3] == pytest.approx(want[3], rel=1e-9, abs=1e-9)
        else:
            assert got[3] is None
    assert tap.slot_of == {} and tap.slots.in_use() == 0


def test_long_requests_keep_the_pooled_digits_where_a_mean_dwarfs_its_spread(tmp_path):
    """Rows whose mean is 1,000 in some dimensions and their spread 0.01, in chunks of up to
    600 rows per step (float32 sums of uncentred rows would lose the pooled distance
    outright): the pooled distance and the probe's logit stay at the float64 reference's."""
    rng = np.random.default_rng(11)
    spread = np.where(np.arange(P) % 3 == 0, 0.01, 1.0)
    offset = np.where(np.arange(P) % 3 == 0, 1000.0, 0.0)
    ref = {l: rng.standard_normal((400, P)) * spread + offset for l in LAYERS}
    token = {l: ShrinkageGaussian.from_moments(len(x), x.sum(0), x.T @ x) for l, x in ref.items()}
    pooled = {l: ShrinkageGaussian().fit(x[:60]) for l, x in ref.items()}
    dets = {"token_mahalanobis": {"layers": {str(l): g.state() for l, g in token.items()}},
            "hidden_mahalanobis": {"layers": {str(l): g.state() for l, g in pooled.items()}},
            "token_probe": LinearProbe(3, rng.standard_normal(P), 0.3).state()}
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"offline": {"layers": list(LAYERS), "window": 8, "stride": 4, "detectors": dets}}))
    tap = HiddenStatsTap(load_hidden_calibration(str(path), LAYERS, 8, 4), 2)
    seen = {l: [] for l in LAYERS}
    for m in (600, 1, 600, 37, 1):
        rows = {l: torch.from_numpy(rng.standard_normal((m, P)) * spread + offset + 0.002).float() for l in LAYERS}
        for l in LAYERS:
            seen[l].append(rows[l].double().numpy())
        tap.add_step(rows, [("w", 0, m)])
    pending = [FrameSeed("w", "w", l, 0, 1239, 0, True, torch.zeros(2, 2), 2, P, 1.0) for l in LAYERS]
    assert tap.before_step(["w"], pending) == 0
    probe = TokenProbe.from_state(dets["token_probe"])
    for seed, got in zip(pending, hidden_values(pending)):
        x = np.concatenate(seen[seed.layer])
        g = pooled[seed.layer]
        assert got[0] == 1239
        assert got[2] == pytest.approx(float(g.sqdist(x.mean(0)[None])[0]) / P, rel=SUM_RTOL)
        if seed.layer == 3:
            want = float(probe.score([{"pooled": {3: x.mean(0)}}])[0])
            assert got[5] == pytest.approx(want, rel=SUM_RTOL, abs=SUM_RTOL)


def test_one_bad_request_costs_only_its_own_statistics(tmp_path):
    """The exporter computes every final frame's statistics in one batch; a part that
    cannot be computed (its LLM-Check rows gone bad) loses its own numbers, not the others'."""
    rng = np.random.default_rng(12)
    path, token, pooled, dets = _calibration(tmp_path, rng)
    tap = HiddenStatsTap(load_hidden_calibration(path, LAYERS, 8, 4), 3)
    rows = {l: torch.from_numpy(rng.standard_normal((12, P)) + l).float() for l in LAYERS}
    tap.add_step(rows, [("ok", 0, 6), ("bad", 6, 12)])
    pending = [FrameSeed(r, r, l, 0, 6, 0, True, torch.zeros(2, 2), 2, P, 1.0) for r in ("ok", "bad") for l in LAYERS]
    assert tap.before_step(["ok", "bad"], pending) == 0
    bad = next(s for s in pending if s.request_id == "bad" and s.layer == 3)
    bad.hidden.mid = "not rows"  # llmcheck_rows raises on it
    got = hidden_values(pending)
    assert got[pending.index(bad)] is None
    for seed, values in zip(pending, got):
        if seed is not bad:
            want = _offline(rows[seed.layer][(0 if seed.request_id == "ok" else 6):][:6].double().numpy(),
                            token, pooled, seed.layer, 3)
            assert values[0] == 6 and values[2] == pytest.approx(want[2], rel=SUM_RTOL)


def test_llmcheck_from_rows_equals_from_scatter_on_both_sides_of_the_width():
    rng = np.random.default_rng(1)
    for n, d in ((2, 9), (9, 9), (5, 40), (41, 40), (3, 3)):
        X = rng.standard_normal((n, d)) * 3 + 1
        assert llmcheck_rows(X) == pytest.approx(llmcheck_scatter(n, X.sum(0), X.T @ X), rel=1e-9, abs=1e-9)
        # float64 reference: mean over the top min(n, d) singular values of the centred rows
        s = np.linalg.svd(X - X.mean(0), compute_uv=False)
        ref = np.mean(0.5 * np.log(np.concatenate([s, np.zeros(min(n, d) - len(s))]) ** 2 + 1e-3))
        assert llmcheck_rows(X) == pytest.approx(ref, rel=1e-7, abs=1e-7)


def test_row_sqdist_matches_the_float64_reference():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 17)) @ rng.standard_normal((17, 17))
    g = ShrinkageGaussian().fit(X)
    cov = g.a * np.eye(17) + g.b * (g.U * g.lam) @ g.U.T
    Y = rng.standard_normal((13, 17)) * 4
    ref = np.einsum("ij,jk,ik->i", Y - g.mean, np.linalg.inv(cov), Y - g.mean) / 17
    got = RowSqdist(g, torch.device("cpu"))(torch.from_numpy(Y).float()).numpy()
    np.testing.assert_allclose(got, ref, rtol=2e-6)  # the rows were float32


@pytest.mark.parametrize("p,r", [(17, 17), (40, 12), (60, 25)])  # full rank, r < p/2 (residual), r < p (V)
def test_row_sqdist_on_rows_the_tap_centred_is_the_same_number(p, r):
    """The tap hands RowSqdist rows it already centred on m rounded to float32 (to sum them):
    the distances are bit for bit those of the raw rows."""
    rng = np.random.default_rng(13)
    gs = []
    for _ in range(2):
        U = np.linalg.qr(rng.standard_normal((p, r)))[0]
        g = LowRankGaussian.from_state({"mean": (rng.standard_normal(p) * 50).tolist(), "a": 0.3, "b": 0.7,
                                        "shrinkage": 0.3, "lam": np.geomspace(100, 0.1, r).tolist(),
                                        "U": U.tolist(), "p": p})
        gs.append(g)
    rs = RowSqdist(gs, torch.device("cpu"))
    x = torch.from_numpy(rng.standard_normal((2, 31, p)) * 3 + np.stack([g.mean for g in gs])[:, None]).float()
    want = rs(x)
    centred = x - torch.from_numpy(np.stack([g.mean for g in gs]).astype(np.float32))[:, None]
    assert torch.equal(rs(centred, centred=True), want)


@pytest.mark.parametrize("p,n,scale", [(384, 5000, 30.0), (256, 3000, 100.0), (383, 200, 10.0), (64, 1000, 1000.0),
                                       (300, 20000, 3.0), (300, 60, 30.0)])
def test_row_sqdist_keeps_its_digits_on_ill_conditioned_spectra(p, n, scale):
    """Token Gaussians whose covariance spans 5 decades, with a dimension of large mean and small
    spread (a "massive activation") and one of large spread: full rank (r = p), low rank from
    moments (p > 256 keeps 256 directions) and from fewer rows than dimensions (n < p; with
    n < p/2 the left-out part is formed as z − U Uᵀz instead of projected on V). Against
    LowRankGaussian.sqdist in float64 on the same float32 rows: ≤ 2e-6 relative per row (measured
    up to 8.4e-7 over 3 draws of each spectrum). Earlier forms: ‖z‖² − ‖Uᵀz‖² for the left-out
    directions reached 1.1e-5; the plain (‖z‖² − Σ w_k (u_kᵀz)²)/a with float32 projections is
    off by up to 2% on these rows."""
    rng = np.random.default_rng(p + n)
    A = rng.standard_normal((p, p)) * np.exp(-np.arange(p) / (p / 8))[None, :]

    def rows(m):
        X = rng.standard_normal((m, p)) @ A.T
        X[:, 0] += scale * 10
        X[:, 1] *= scale
        return X

    X = rows(n)
    g = ShrinkageGaussian.from_moments(n, X.sum(0), X.T @ X) if n > p else ShrinkageGaussian().fit(X)
    assert (g.a + g.b * g.lam.max()) / g.a > 700  # the spectrum is as awkward as intended
    assert RowSqdist(g, torch.device("cpu")).resid == (p > 2 * g.U.shape[1])
    Y = rows(500).astype(np.float32)
    ref = g.sqdist(Y.astype(np.float64)) / p
    got = RowSqdist(g, torch.device("cpu"))(torch.from_numpy(Y)).numpy()
    assert got.dtype == np.float64 and got.shape == (500,)
    np.testing.assert_allclose(got, ref, rtol=2e-6)


def test_row_sqdist_of_several_gaussians_in_one_call_equals_each_alone():
    """The tap's call: one Gaussian per layer, of one width but different ranks (full, from fewer
    rows than dimensions, with and without directions 100× wider than the rest), rows [G, N, p] -> [G, N]; each
    equal to that Gaussian alone and to the float64 reference. Mixed widths are refused."""
    rng = np.random.default_rng(6)
    p = 40
    X = rng.standard_normal((400, p)) * np.geomspace(0.01, 30, p)  # a spectrum over 6 decades
    gs = [ShrinkageGaussian.from_moments(400, X.sum(0), X.T @ X),
          ShrinkageGaussian().fit(rng.standard_normal((25, p)) + 3),  # r = 24 < p
          ShrinkageGaussian.from_moments(300, *(lambda Y: (Y.sum(0), Y.T @ Y))(rng.standard_normal((300, p))))]
    ks = [int(((g.a + g.b * g.lam) / g.a > 100).sum()) for g in gs]
    assert ks[0] > 0 and ks[2] == 0 and gs[1].U.shape[1] < p  # the shapes are as awkward as intended
    Y = (rng.standard_normal((3, 17, p)) * 5).astype(np.float32)
    both = RowSqdist(gs, torch.device("cpu"))(torch.from_numpy(Y)).numpy()
    assert both.shape == (3, 17)
    for i, g in enumerate(gs):
        alone = RowSqdist(g, torch.device("cpu"))(torch.from_numpy(Y[i])).numpy()
        np.testing.assert_allclose(both[i], alone, rtol=1e-12)
        np.testing.assert_allclose(both[i], g.sqdist(Y[i].astype(np.float64)) / p, rtol=2e-6)
    # ranks under p/2 (the left-out part formed as z − U Uᵀz), of different ranks in one call
    low = [ShrinkageGaussian().fit(rng.standard_normal((m, p)) * np.geomspace(0.1, 10, p)) for m in (12, 16)]
    call = RowSqdist(low, torch.device("cpu"))
    assert call.resid
    both = call(torch.from_numpy(Y[:2])).numpy()
    for i, g in enumerate(low):
        np.testing.assert_allclose(both[i], g.sqdist(Y[i].astype(np.float64)) / p, rtol=2e-6)
    # a float64 input is left as it was
    y64 = torch.from_numpy(Y[0].astype(np.float64))
    keep = y64.clone()
    RowSqdist(gs[0], torch.device("cpu"))(y64)
    assert torch.equal(y64, keep)
    with pytest.raises(ValueError, match="one width"):
        RowSqdist([gs[0], ShrinkageGaussian().fit(rng.standard_normal((30, p + 1)))], torch.device("cpu"))


def test_a_layer_without_token_gaussian_gets_none_and_the_others_stay_exact(tmp_path):
    rng = np.random.default_rng(7)
    path, token, pooled, dets = _calibration(tmp_path, rng)
    doc = json.loads(open(path).read())
    del doc["offline"]["detectors"]["token_mahalanobis"]["layers"]["3"]
    (tmp_path / "partial.json").write_text(json.dumps(doc))
    tap = HiddenStatsTap(load_hidden_calibration(str(tmp_path / "partial.json"), LAYERS, 8, 4), 2)
    seen = {l: [] for l in LAYERS}
    for m in (6, 1, 1, 30):
        rows = {l: torch.from_numpy(rng.standard_normal((m, P)) * 2 + l).float() for l in LAYERS}
        for l in LAYERS:
            seen[l].append(rows[l].double().numpy())
        tap.add_step(rows, [("q", 0, m)])
    with pytest.raises(RuntimeError, match="rows of every tapped layer"):
        tap.add_step({1: torch.zeros(2, P)}, [("q", 0, 2)])
    pending = [FrameSeed("q", "q", l, 0, 38, 0, True, torch.zeros(2, 2), 2, P, 1.0) for l in LAYERS]
    assert tap.before_step(["q"], pending) == 0
    for seed, got in zip(pending, hidden_values(pending)):
        want = _offline(np.concatenate(seen[seed.layer]), token, pooled, seed.layer, 3)
        assert got[0] == 38
        if seed.layer == 3:
            assert np.isnan(got[1])
        else:
            assert got[1] == pytest.approx(want[1], rel=TOKEN_RTOL)
        assert got[2] == pytest.approx(want[2], rel=SUM_RTOL)


def test_llmcheck_reads_the_first_rows_live_and_offline_alike(tmp_path):
    """A request longer than LLMCHECK_ROWS, in chunks that straddle it and between other
    requests: the tap's LLM-Check equals the offline capture's (hooks/capture.py ->
    features.sum_features) and the score of the first 256 rows, not of all of them."""
    from eigenwatch.hooks.capture import TokenSums
    from eigenwatch.kernels.hidden_stats import LLMCHECK_ROWS
    from eigenwatch.monitor.offline.features import sum_features

    rng = np.random.default_rng(8)
    path, *_ = _calibration(tmp_path, rng)
    tap = HiddenStatsTap(load_hidden_calibration(path, LAYERS, 8, 4), 3)
    sums = TokenSums()
    seen = []
    plan = [[("L", 200), ("s", 5)], [("s", 1), ("L", 50)], [("L", 1), ("s", 1)], [("L", 30)], [("L", 1)]]
    for step in plan:
        items, at = [], 0
        for rid, m in step:
            items.append((rid, at, at + m))
            at += m
        rows = {l: torch.from_numpy(rng.standard_normal((at, P)) * (1 + np.arange(P) % 5) + l).float()
                for l in LAYERS}
        for rid, lo, hi in items:
            if rid == "L":
                seen.append(rows[3][lo:hi].double().numpy())
        tap.add_step(rows, items)
        for l in LAYERS:
            sums.add(l, rows[l], items)
    X = np.concatenate(seen)
    assert len(X) == 282 > LLMCHECK_ROWS
    pending = [FrameSeed(r, r, 3, 0, 1, 0, True, torch.zeros(2, 2), 2, P, 1.0) for r in ("L", "s")]
    assert tap.before_step(["L", "s"], pending) == 0
    live = hidden_values(pending)[0][3]
    sums.finish("L")
    offline = sum_features(sums.pop(["L"])["L"], LAYERS)["llmcheck"]
    assert live == pytest.approx(offline, rel=1e-9, abs=1e-9)
    assert live == pytest.approx(llmcheck_rows(X[:LLMCHECK_ROWS]), rel=1e-9, abs=1e-9)
    assert abs(live - llmcheck_rows(X)) > 1e-3  # the cap changes the score of a longer text


def test_calibration_problems_name_the_field(tmp_path):
    rng = np.random.default_rng(3)
    path, *_ = _calibration(tmp_path, rng)
    with pytest.raises(ValueError, match=r"offline.layers .* EIGENWATCH_LAYERS=1,3,4"):
        load_hidden_calibration(path, (0, 1, 2), 8, 4)
    with pytest.raises(ValueError, match=r"offline.stride is 4 .* EIGENWATCH_STRIDE=16"):
        load_hidden_calibration(path, LAYERS, 8, 16)
    with pytest.raises(ValueError, match="cannot read"):
        load_hidden_calibration(str(tmp_path / "missing.json"), LAYERS, 8, 4)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_hidden_calibration(str(tmp_path / "bad.json"), LAYERS, 8, 4)
    doc = json.loads(open(path).read())
    doc["offline"]["detectors"]["token_mahalanobis"]["layers"]["1"]["a"] = -1.0
    (tmp_path / "damaged.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="damaged Gaussian"):
        load_hidden_calibration(str(tmp_path / "damaged.json"), LAYERS, 8, 4)
    doc = json.loads(open(path).read())
    doc["offline"]["detectors"]["token_probe"]["layer"] = 2
    (tmp_path / "probe.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"detectors.token_probe.layer is 2, which the tap does not watch"):
        load_hidden_calibration(str(tmp_path / "probe.json"), LAYERS, 8, 4)
    del doc["offline"]["detectors"]["token_probe"]["w"]
    (tmp_path / "probe.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"detectors.token_probe.w is missing"):
        load_hidden_calibration(str(tmp_path / "probe.json"), LAYERS, 8, 4)
    (tmp_path / "spike.json").write_text(json.dumps({"models": {}}))
    assert load_hidden_calibration(str(tmp_path / "spike.json"), LAYERS, 8, 4) is None
    # rows of another width than the Gaussians': refused at the first rows, not silently wrong
    tap = HiddenStatsTap(load_hidden_calibration(path, LAYERS, 8, 4), 2)
    with pytest.raises(ValueError, match="recalibrate on this model"):
        tap.add_step({l: torch.zeros(3, P + 1) for l in LAYERS}, [("x", 0, 3)])


def test_low_rank_gaussian_state_round_trips_and_refuses_damage():
    rng = np.random.default_rng(4)
    g = ShrinkageGaussian().fit(rng.standard_normal((30, 6)))
    h = LowRankGaussian.from_state(json.loads(json.dumps(g.state())))
    Y = rng.standard_normal((4, 6))
    np.testing.assert_array_equal(h.sqdist(Y), g.sqdist(Y))
    st = g.state()
    st["mean"] = st["mean"][:5]
    with pytest.raises(ValueError, match="mean"):
        LowRankGaussian.from_state(st)


def test_running_values_cover_the_rows_so_far(tmp_path):
    rng = np.random.default_rng(5)
    path, token, pooled, dets = _calibration(tmp_path, rng)
    cal = load_hidden_calibration(path, LAYERS, 8, 4)
    tap = HiddenStatsTap(cal, max_requests=2)
    seen = {l: [] for l in LAYERS}
    for m in (7, 1, 1, 3):
        rows = {l: torch.from_numpy(rng.standard_normal((m, P)) + l).float() for l in LAYERS}
        for l in LAYERS:
            seen[l].append(rows[l].double().numpy())
        tap.add_step(rows, [("g", 0, m)])
    seeds = [FrameSeed("g", "g", l, 0, 12, 0, False, torch.zeros(2, 2), 2, P, 1.0) for l in LAYERS]
    seeds.append(FrameSeed("other", "other", 1, 0, 12, 0, False, torch.zeros(2, 2), 2, P, 1.0))  # not tracked
    earlier = FrameSeed("g", "g", 3, 0, 8, 0, False, torch.zeros(2, 2), 2, P, 1.0)  # the same step, an earlier window
    tap.attach_running([earlier] + seeds)
    assert earlier.hidden is None  # the step's last seed of the layer carries the step's sums
    for seed, got in zip(seeds[:3], hidden_values(seeds)[:3]):
        want = _offline(np.concatenate(seen[seed.layer]), token, pooled, seed.layer, None,
                        TokenProbe.from_state(dets["token_probe"]))
        assert got[0] == 12 and got[3] is None
        assert got[1] == pytest.approx(want[1], rel=TOKEN_RTOL) and got[2] == pytest.approx(want[2], rel=SUM_RTOL)
        assert (got[5] is None) == (seed.layer != 3)  # the probe's running value, over the rows so far
        if got[5] is not None:
            assert got[5] == pytest.approx(want[4], rel=SUM_RTOL, abs=SUM_RTOL)
    assert seeds[3].hidden is None
