"""The drift detector: CALIB.json's drift section, the tap's top-direction windows (hooks/sketches.py) fed
to the sidecar's drift logic (monitor/sidecar/drift.py) on planted streams, and the sidecar over real gRPC
and /metrics with synthetic snapshots."""

from __future__ import annotations

import argparse
import json
import math
import threading

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from eigenwatch.hooks.sketches import LayerSketches
from eigenwatch.monitor import calibration as calib
from eigenwatch.monitor.mahalanobis import TokenMoments
from eigenwatch.monitor.offline.calibrate import drift_calibration
from eigenwatch.monitor.sidecar.alerts import AlertHub
from eigenwatch.monitor.sidecar.drift import DriftMonitor
from eigenwatch.monitor.sidecar.metrics import Metrics
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

from conftest import metric_value, scrape, wait_for

D, EVERY, PERSIST = 32, 4096, 3


def basis(seed=0):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((D, D)))[0]


def rotated(q, degrees):
    """q with its top two columns turned by `degrees` in their plane: the planted top direction moves by it."""
    t = math.radians(degrees)
    r = q.copy()
    r[:, 0] = math.cos(t) * q[:, 0] + math.sin(t) * q[:, 1]
    r[:, 1] = -math.sin(t) * q[:, 0] + math.cos(t) * q[:, 1]
    return r


def stream(rng, q, n, gap=3.0):
    """n rows with second moment q diag(gap, 1, 2^-1/2, ...) qᵀ: top direction q[:, 0], λ1/λ2 = gap."""
    lam = np.concatenate([[gap], 1.0 / np.sqrt(np.arange(1, D))])
    return ((rng.standard_normal((n, D)) * np.sqrt(lam)) @ q.T).astype(np.float32)


def snapshot(w, model="m"):
    v = w.directions()
    return monitor_pb2.DirectionSnapshot(model=model, layer=w.layer, tokens_seen=w.tokens_seen,
                                         window_tokens=w.window_tokens, rows=w.rows, dim=v.shape[1], k=v.shape[0],
                                         directions=v.astype("<f4").tobytes())


def calibrated(q, seed=1):
    """The drift section `eigenwatch calibrate` writes for this stream: reference from 40k fit rows, thresholds
    from 20 windows of calibration rows through the tap's windows (the calibrate code itself)."""
    rng = np.random.default_rng(seed)
    fit = stream(rng, q, 40_000).astype(np.float64)
    acc = TokenMoments()
    acc.observe(1, len(fit), fit.sum(0), fit.T @ fit)
    sk = LayerSketches(EVERY)
    windows = [w for _ in range(20) for w in sk.add_step({1: stream(rng, q, EVERY)})]
    args = argparse.Namespace(drift_every=EVERY, drift_sample=1, drift_persist=PERSIST, drift_margin=1.5)
    return drift_calibration("m", acc, windows, args)


def monitor(cal):
    metrics = Metrics(CollectorRegistry())
    hub = AlertHub(metrics)
    return DriftMonitor(cal, metrics, hub), metrics


def run(mon, windows):
    angles = []
    for w in windows:
        angles.append((w.tokens_seen, mon.observe(snapshot(w))))
    return angles


@pytest.fixture(scope="module")
def cal():
    return calibrated(basis())


def test_calibration_thresholds_follow_the_rule(cal):
    ref = cal.layers[("m", 1)]
    assert ref.windows == 20
    assert abs(abs(ref.direction @ basis()[:, 0]) - 1) < 1e-3  # the planted direction
    assert ref.alert_deg == pytest.approx(1.5 * ref.clear_deg)
    assert 0 < ref.clear_deg < 10  # R = 3, 4096 rows of d = 32: a few degrees of noise


def test_stationary_million_rows_raise_no_drift_alert(cal):
    q = basis()
    mon, metrics = monitor(cal)
    rng = np.random.default_rng(7)
    sk = LayerSketches(EVERY)
    n, angles = 0, []
    while n < 1_000_000:
        x = stream(rng, q, 5000)  # steps of uneven size against the window: windows split steps
        n += len(x)
        angles += run(mon, sk.add_step({1: x}))
    assert len(angles) == n // EVERY
    st = mon.streams[("m", 1)]
    assert st.snapshots == len(angles) and not st.alerted
    assert st.alerts == []
    assert metrics.registry.get_sample_value("eigenwatch_alerts_total", {"model": "m", "detector": "drift",
                                                                         "severity": "warning"}) is None
    print(f"stationary: {len(angles)} windows, angle max {max(a for _, a in angles):.2f}° "
          f"(alert above {cal.layers[('m', 1)].alert_deg:.2f}°)")


def test_rotating_the_top_direction_30_degrees_raises_drift_within_the_delay(cal):
    q = basis()
    mon, metrics = monitor(cal)
    rng = np.random.default_rng(8)
    sk = LayerSketches(EVERY)
    before = [w for _ in range(10) for w in sk.add_step({1: stream(rng, q, EVERY)})]
    at = before[-1].tokens_seen  # the rotation lands on a window edge
    run(mon, before)
    assert not mon.streams[("m", 1)].alerted
    after = [w for _ in range(10) for w in sk.add_step({1: stream(rng, rotated(q, 30), EVERY)})]
    angles = run(mon, after)
    st = mon.streams[("m", 1)]
    assert len(st.alerts) == 1  # hysteresis: one alert for the whole excursion
    alert = st.alerts[0]
    assert alert.detector == "drift" and alert.layer == 1 and alert.request_id == ""
    # configured delay: `persist` windows above the angle, each window `every` tokens
    assert at < alert.token_count <= at + PERSIST * EVERY
    assert all(a == pytest.approx(30, abs=8) for _, a in angles)
    got = metrics.registry.get_sample_value("eigenwatch_top_direction_angle_degrees", {"model": "m", "layer": "1"})
    assert got == pytest.approx(angles[-1][1])
    # back to the reference: re-armed, and a second rotation alerts again
    run(mon, [w for _ in range(2) for w in sk.add_step({1: stream(rng, q, EVERY)})])
    assert not st.alerted
    run(mon, [w for _ in range(4) for w in sk.add_step({1: stream(rng, rotated(q, -30), EVERY)})])
    assert len(st.alerts) == 2


def test_drift_section_round_trip_and_checks(cal, tmp_path):
    path = tmp_path / "cal.json"
    spike = {("m", 1): calib.LayerCalibration(0.5, 2)}
    calib.save(path, calib.document(spike, drift=cal))
    got = calib.load(path).drift
    ref, back = cal.layers[("m", 1)], got.layers[("m", 1)]
    assert (got.every, got.sample, got.persist) == (EVERY, 1, PERSIST)
    np.testing.assert_allclose(back.direction, ref.direction, atol=1e-6)
    assert (back.alert_deg, back.clear_deg, back.windows) == (ref.alert_deg, ref.clear_deg, ref.windows)

    doc = json.loads(path.read_text())
    doc["drift"]["version"] = 2
    path.write_text(json.dumps(doc))
    with pytest.raises(calib.CalibrationError, match=r"drift\.version: 2 is not supported \(expected 1\)"):
        calib.load(path)
    doc["drift"]["version"] = 1
    doc["drift"]["models"]["m"]["1"]["clear_deg"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(calib.CalibrationError, match=r"drift\.models\.m\.1\.clear_deg: expected an angle in \[0, 90\]"):
        calib.load(path)


# ---- the sidecar over real gRPC ----

def _unit(angle_deg, dim=16):
    v = np.zeros(dim)
    v[0], v[1] = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return v


def _snap(angle_deg, tokens, model="m", layer=2, every=1024, dim=16):
    v = np.stack([_unit(angle_deg, dim), np.eye(dim)[2]]).astype("<f4")  # k = 2: the angle reads the first
    return monitor_pb2.DirectionSnapshot(model=model, layer=layer, tokens_seen=tokens, window_tokens=every,
                                         rows=every, dim=dim, k=2, directions=v.tobytes())


def collect(call, out):
    try:
        for a in call:
            out.append(a)
    except grpc.RpcError:  # cancelled at the end of the test
        pass


def test_sidecar_drift_alerts_and_angle_metric_over_grpc(sidecar_factory, tmp_path):
    drift = calib.DriftCalibration(every=1024, sample=1, persist=2,
                                   layers={("m", 2): calib.LayerDrift(_unit(0), 20.0, 10.0, 5)})
    path = tmp_path / "cal.json"
    calib.save(path, calib.document({("m", 2): calib.LayerCalibration(0.5, 2)}, drift=drift))
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0", "--calibration", str(path))
    ch = grpc.insecure_channel(sc.grpc)
    stub = monitor_pb2_grpc.MonitorStub(ch)
    alerts = []
    call = stub.WatchAlerts(monitor_pb2.WatchAlertsRequest(detector="drift"))
    threading.Thread(target=collect, args=(call, alerts), daemon=True).start()
    wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_alert_watchers") == 1, what="watcher")

    angles = [5, 35, 15, 35, 40, 45, 5, 30, 30]  # alert at the 2nd of two in a row; re-arm below 10
    batches = [monitor_pb2.FrameBatch(directions=[_snap(a, 1024 * (i + 1))]) for i, a in enumerate(angles)]
    batches.append(monitor_pb2.FrameBatch(directions=[_snap(50, 1024, layer=7)]))  # no reference: counted only
    summary = stub.Ingest(iter(batches))
    assert summary.frames_rejected == 0
    wait_for(lambda: len(alerts) == 2, what="two drift alerts")
    assert [a.token_count for a in alerts] == [5 * 1024, 9 * 1024]
    assert all(a.detector == "drift" and a.layer == 2 and a.model == "m" and a.request_id == "" for a in alerts)
    assert alerts[0].value == pytest.approx(40, abs=1e-3) and alerts[0].threshold == 20

    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_top_direction_angle_degrees", model="m", layer="2") == pytest.approx(30, abs=1e-3)
    assert metric_value(text, "eigenwatch_direction_snapshots_total", model="m", layer="2", result="compared") == 9
    assert metric_value(text, "eigenwatch_direction_snapshots_total", model="m", layer="7", result="no_reference") == 1
    assert metric_value(text, "eigenwatch_alerts_total", model="m", detector="drift", severity="warning") == 2
    assert metric_value(text, "eigenwatch_drift_threshold_degrees", model="m", layer="2", bound="alert") == 20

    bad = _snap(5, 1024)
    bad.directions = bad.directions[:-4]
    with pytest.raises(grpc.RpcError) as err:
        stub.Ingest(iter([monitor_pb2.FrameBatch(directions=[_snap(5, 1024), bad])]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch 0: directions[1].directions: has 124 bytes but k=2 × dim=16 needs 128" in err.value.details()
    call.cancel()
    ch.close()


@pytest.mark.parametrize("env,words", [
    ({"EIGENWATCH_SKETCH": "yes"}, ["EIGENWATCH_SKETCH", "on, off", "'yes'"]),
    ({"EIGENWATCH_SKETCH_EVERY": "1"}, ["EIGENWATCH_SKETCH_EVERY", "[2, 1073741824]", "1"]),
    ({"EIGENWATCH_SKETCH_EVERY": "64", "EIGENWATCH_SKETCH_SAMPLE": "65"},
     ["EIGENWATCH_SKETCH_SAMPLE", "[1, EIGENWATCH_SKETCH_EVERY=64]", "65"]),
])
def test_sketch_settings_name_the_variable_and_accepted_values(monkeypatch, env, words):
    from eigenwatch.hooks.config import TapConfig

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError) as err:
        TapConfig.from_env()
    assert all(w in str(err.value) for w in words), str(err.value)
    monkeypatch.setenv("EIGENWATCH_SKETCH", "ON")
    monkeypatch.setenv("EIGENWATCH_SKETCH_EVERY", "2048")
    monkeypatch.setenv("EIGENWATCH_SKETCH_SAMPLE", "4")
    cfg = TapConfig.from_env()
    assert (cfg.sketch, cfg.sketch_every, cfg.sketch_sample) == ("on", 2048, 4)


def test_windows_split_steps_exactly_and_keep_only_tracked_rows():
    rng = np.random.default_rng(3)
    x = stream(rng, basis(), 700)
    sk = LayerSketches(256, sample=3)
    # rows 100..149 belong to an opted-out request: never fed
    items = [("a", 0, 100), ("b", 150, 700)]
    got = sk.add_step({1: x, 2: x}, items)
    assert sorted((w.layer, w.tokens_seen, w.window_tokens) for w in got) == [(1, 256, 256), (1, 512, 256),
                                                                              (2, 256, 256), (2, 512, 256)]
    assert all(w.rows in (85, 86) for w in got)  # one row in 3 of 256 tokens
    more = sk.add_step({1: x[:50]})
    assert more == [] and sk.layers[1].window == 650 - 512 + 50
    v = got[0].directions(k=3)
    assert v.shape == (3, D) and v.dtype == np.float32
    np.testing.assert_allclose(v @ v.T, np.eye(3), atol=1e-5)
