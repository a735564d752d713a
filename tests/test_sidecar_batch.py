"""The sidecar's batch-at-a-time ingest path (issue 16's throughput work) gives what the
frame-at-a-time code gives: the same problems named for the same frames, the same spike
counts and severities, and the same Prometheus series as prometheus-client's own Counter
and Histograms would export for those values."""

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES, describe
from eigenwatch.monitor.calibration import LayerCalibration
from eigenwatch.monitor.sidecar.metrics import (ENTROPY_BUCKETS, LAMBDA_BUCKETS, RISK_BUCKETS, SPIKE_BUCKETS,
                                                BatchHistogram, WindowMetrics)
from eigenwatch.monitor.sidecar.server import spectrum_batch, validate_frame
from eigenwatch.monitor.spectral_spike import DimMismatch, SpikeDetector
from eigenwatch.v1 import monitor_pb2

INDEX = {n: i for i, n in enumerate(DESCRIPTOR_NAMES)}


def spectrum(seed, window, dim, spikes=0):
    """A real window's float32 eigenvalues and descriptors, with `spikes` directions made strong."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((window, dim))
    if spikes:
        x[:, :spikes] *= 8.0
    xc = x - x.mean(0)
    eigs = np.sort(np.linalg.eigvalsh(xc @ xc.T / dim))[::-1].clip(0)
    return eigs.astype(np.float32).tolist(), describe(eigs, window, dim).tolist()


def frame(i, layer=0, window=16, dim=64, spikes=0, **over):
    eigs, desc = spectrum(i, window, dim, spikes)
    kw = dict(request_id=f"r{i}", engine_request_id=f"r{i}-0", model="m", layer=layer, step=1, token_count=16,
              window=window, dim=dim, eigenvalues=eigs, descriptors=desc)
    kw.update(over)
    return monitor_pb2.Frame(**kw)


def with_desc(f, name, value):
    d = list(f.descriptors)
    d[INDEX[name]] = value
    del f.descriptors[:]
    f.descriptors.extend(d)
    return f


def changed(f, **fields):
    for name, value in fields.items():
        if name == "eigenvalues":
            del f.eigenvalues[:]
            f.eigenvalues.extend(value)
        else:
            setattr(f, name, value)
    return f


def with_eig(f, i, value):
    e = list(f.eigenvalues)
    e[i] = value
    del f.eigenvalues[:]
    f.eigenvalues.extend(e)
    return f


def detector():
    # layers 0 (window 16, dim 64) and 2 (window 32, dim 64) calibrated; layer 1 still learning
    return SpikeDetector({("m", 0): LayerCalibration(sigma2=0.9, spike_threshold=1, dim=64),
                          ("m", 2): LayerCalibration(sigma2=0.9, spike_threshold=0, dim=64)},
                         calibration_frames=64, calibration_requests=2)


def mixed_batch():
    frames = [frame(i, spikes=i % 5) for i in range(12)]  # valid, 0..4 strong directions
    frames += [frame(20 + i, layer=2, window=32, spikes=i) for i in range(4)]  # another window size
    frames += [
        frame(40, layer=1),  # a layer still calibrating: left to SpikeDetector.observe
        frame(41, dim=32),  # another width than the calibration's: observe raises DimMismatch
        with_eig(frame(42), 3, math.nan),
        with_desc(frame(43), "lambda1", math.inf),
        with_eig(frame(44), 15, -1.0),  # a Gram has no negative eigenvalue
        with_desc(frame(45), "sigma2", -0.5),
        with_desc(frame(46), "trace_mean", 0.0),  # no spectrum: nothing to flag
        frame(47, request_id=""),
        frame(48, token_count=-1),
        frame(49, eigenvalues=[1.0, 2.0]),  # 2 values for a window of 16
        changed(frame(50), window=1, eigenvalues=[1.0]),
        changed(frame(51), window=4096),
        changed(frame(52), dim=0),
    ]
    return monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, frames=frames)


def test_batch_path_names_the_same_problems_and_counts_the_same_spikes():
    b = mixed_batch()
    n = len(DESCRIPTOR_NAMES)
    got = spectrum_batch(b.frames, {}, n, INDEX, detector())
    ref = detector()
    seen_spikes = set()
    for j, f in enumerate(b.frames):
        eigs = np.asarray(f.eigenvalues, dtype=np.float64)
        desc = np.asarray(f.descriptors, dtype=np.float64)
        want = validate_frame(f, n, eigs, desc, INDEX)
        if j not in got:  # value counts that do not match: left to validate_frame alone
            assert want is not None and want[0] in ("eigenvalues", "window", "dim")
            continue
        g_eigs, g_desc, g_problem, g_spike = got[j]
        assert g_problem == want, j
        np.testing.assert_array_equal(g_eigs, eigs)
        np.testing.assert_array_equal(g_desc, desc)
        if want is not None:
            continue
        try:
            exp = ref.observe(f.model, f.layer, eigs, f.window, f.dim, desc[INDEX["sigma2"]],
                              desc[INDEX["trace_mean"]], f.engine_request_id)
        except DimMismatch:
            assert g_spike is None  # the caller passes it to observe, which raises
            continue
        if f.layer == 1:
            assert g_spike is None and exp.spikes is None  # calibrating: observe learns from it
            continue
        assert g_spike == exp, j
        seen_spikes.add(exp.spikes)
    # the batch exercised real counts and every branch above
    assert len(seen_spikes - {None}) >= 3 and None in seen_spikes
    problems = {got[j][2][0] for j in got if got[j][2] is not None}
    assert problems == {"eigenvalues", "descriptors", "request_id", "token_count", "dim"}


def test_frames_of_a_refused_index_are_skipped():
    b = mixed_batch()
    got = spectrum_batch(b.frames, {0: ("model", "x"), 3: ("", "layers")}, len(DESCRIPTOR_NAMES), INDEX, detector())
    assert 0 not in got and 3 not in got and 1 in got


def test_window_metrics_export_what_prometheus_client_would():
    rng = np.random.default_rng(0)
    wm = WindowMetrics()
    reg = CollectorRegistry()
    reg.register(wm)
    ref = CollectorRegistry()
    ml = ["model", "layer"]
    c = Counter("eigenwatch_frames_ingested", "", ml, registry=ref)
    hs = {name: Histogram(metric, "", ml, buckets=b, registry=ref)
          for name, metric, b in (("entropy", "eigenwatch_spectral_entropy_nats", ENTROPY_BUCKETS),
                                  ("lambda1", "eigenwatch_lambda1", LAMBDA_BUCKETS),
                                  ("spikes", "eigenwatch_spikes", SPIKE_BUCKETS))}
    keys = [("m", 0), ("m", 1), ("other", 7)] + [(f"k{i}", i) for i in range(20)]  # rows grow past 8 and 16
    for _ in range(30):  # batches
        picks = rng.integers(len(keys), size=64)
        # values on bucket bounds (Prometheus' le is <=), between them, past the last one
        ent = np.where(rng.random(64) < 0.3, rng.choice(ENTROPY_BUCKETS, 64), rng.uniform(0, 5, 64))
        lam = 10.0 ** rng.uniform(-5, 8, 64)
        lam[:4] = LAMBDA_BUCKETS[:4]
        spikes = rng.integers(0, 40, 64)
        has = rng.random(64) < 0.7  # frames the spike detector counted
        rows = [wm.row(*keys[p]) for p in picks]
        wm.add(rows, ent.tolist(), lam.tolist(), [r for r, h in zip(rows, has) if h],
               [int(s) for s, h in zip(spikes, has) if h])
        for k, p in enumerate(picks):
            model, layer = keys[p][0], str(keys[p][1])
            c.labels(model, layer).inc()
            hs["entropy"].labels(model, layer).observe(ent[k])
            hs["lambda1"].labels(model, layer).observe(lam[k])
            if has[k]:
                hs["spikes"].labels(model, layer).observe(int(spikes[k]))

    def samples(registry):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for m in registry.collect() for s in m.samples if not s.name.endswith("_created")}

    got, want = samples(reg), samples(ref)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-9), key
    # the scrape is the text Prometheus reads: same lines as the reference registry's
    from prometheus_client import generate_latest

    def lines(registry):
        return sorted(l for l in generate_latest(registry).decode().splitlines()
                      if l and not l.startswith("#") and "_created" not in l)

    assert [l.rsplit(" ", 1)[0] for l in lines(reg)] == [l.rsplit(" ", 1)[0] for l in lines(ref)]


def test_batch_histogram_exports_what_prometheus_client_would():
    """eigenwatch_risk is observed a model call's batch at a time: the same series, values
    and text as a prometheus-client Histogram observed value by value, a touched model at zero."""
    from prometheus_client import generate_latest

    rng = np.random.default_rng(1)
    bh = BatchHistogram("eigenwatch_risk", "risk", RISK_BUCKETS)
    reg = CollectorRegistry()
    reg.register(bh)
    ref = CollectorRegistry()
    h = Histogram("eigenwatch_risk", "risk", ["model"], buckets=RISK_BUCKETS, registry=ref)
    for model in ("idle", "m"):
        bh.touch(model)
        h.labels(model)
    for k in range(25):
        n = int(rng.integers(0, 300))  # an empty batch too
        v = np.where(rng.random(n) < 0.3, rng.choice(RISK_BUCKETS, n), rng.random(n))  # on the bounds (le is <=)
        v[:2] = [0.0, 1.0][:n]
        model = ("m", "other")[k % 2]
        bh.add(model, v)
        for x in v:
            h.labels(model).observe(float(x))

    def lines(registry):
        return sorted(l for l in generate_latest(registry).decode().splitlines()
                      if l and not l.startswith("#") and "_created" not in l)

    got, want = lines(reg), lines(ref)
    assert [l.rsplit(" ", 1)[0] for l in got] == [l.rsplit(" ", 1)[0] for l in want]
    for g, w in zip(got, want):
        assert float(g.rsplit(" ", 1)[1]) == pytest.approx(float(w.rsplit(" ", 1)[1]), rel=1e-12, abs=1e-12), g
    assert 'eigenwatch_risk_count{model="idle"} 0.0' in got
