"""The sidecar against an abusive or broken client (issue 16): each test reproduces one
finding of the probe — unbounded labels, huge frames, memory beyond --max-requests,
calibration poisoning from one request, learned layers lost on restart, a GetReport
loop stalling everyone, silent watchers, garbage bytes, forged log lines — over real
gRPC and real /metrics, and checks the bound now holds."""

import json
import threading
import time

import grpc
import numpy as np
import pytest

from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES, describe
from eigenwatch.monitor import calibration as calib
from eigenwatch.monitor.spectral_spike import SpikeDetector, max_sigma2_rel
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

from conftest import SidecarClient, metric_value, scrape, wait_for, write_firing_calibration

SIGMA2, TRACE = DESCRIPTOR_NAMES.index("sigma2"), DESCRIPTOR_NAMES.index("trace_mean")


def spectrum(seed: int, window: int = 16, dim: int = 64):
    """A real window's eigenvalues (descending, float32 as the tap sends them) and descriptors."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((window, dim))
    xc = x - x.mean(0)
    eigs = np.sort(np.linalg.eigvalsh(xc @ xc.T / dim))[::-1].clip(0)
    return eigs.astype(np.float32).tolist(), describe(eigs, window, dim).tolist()


def frame(rid="r1", model="m", layer=0, token_count=16, seed=0, window=16, dim=64, final=False, **over):
    eigs, desc = spectrum(seed, window, dim)
    kw = dict(request_id=rid, engine_request_id=rid + "-0123abcd", model=model, layer=layer, step=1,
              token_count=token_count, window=window, dim=dim, eigenvalues=eigs, descriptors=desc, final=final)
    kw.update(over)
    return monitor_pb2.Frame(**kw)


def batch(frames, names=DESCRIPTOR_NAMES):
    return monitor_pb2.FrameBatch(descriptor_names=names, frames=frames)


def ingest(target, batches, timeout=30):
    with grpc.insecure_channel(target) as ch:
        return monitor_pb2_grpc.MonitorStub(ch).Ingest(iter(batches), timeout=timeout)


def ingest_error(target, batches) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        ingest(target, batches)
    return err.value


SIDECAR = ("--listen", "127.0.0.1:0", "--metrics-port", "0")


# ---- 1. bounds in bytes ----------------------------------------------------------------

def test_label_values_are_capped_and_refusals_counted(sidecar_factory):
    """10k (model, layer) pairs used to add ~52 series each, forever. Now the first
    --max-models models and --max-layers pairs are admitted; the rest are refused with
    RESOURCE_EXHAUSTED (the admitted frames of the batch are kept) and counted."""
    sc = sidecar_factory(*SIDECAR, "--max-models", "3", "--max-layers", "5")
    frames = [frame(f"r{i}", model=f"model-{i}", layer=0) for i in range(20)]
    err = ingest_error(sc.grpc, [batch(frames)])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-models" in err.details()
    text = scrape(sc.metrics)
    models = {s.split('model="')[1].split('"')[0] for s in text.splitlines()
              if s.startswith("eigenwatch_frames_ingested_total{")}
    assert models == {"model-0", "model-1", "model-2"}
    assert metric_value(text, "eigenwatch_refused_total", reason="models") == 17

    layers = [frame("q", model="model-0", layer=layer) for layer in range(1, 10)]
    err = ingest_error(sc.grpc, [batch(layers)])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-layers" in err.details()
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_refused_total", reason="layers") == 7  # 3 + 2 admitted of 5
    assert sorted(l.layer for l in SidecarClient(sc.grpc).report("q").layers) == [1, 2]
    # tap stats of a fourth model do not make a label either
    ingest(sc.grpc, [monitor_pb2.FrameBatch(stats=monitor_pb2.TapStats(tap_id="t", model="model-99"))])
    assert 'model="model-99"' not in scrape(sc.metrics)


def test_oversized_frames_are_refused_before_anything_is_stored(sidecar_factory):
    """A 1 MB model name made a 58 MB /metrics page; 100k descriptor names grew one
    request's history by ~86 MB. Both are refused as INVALID_ARGUMENT, nothing of them kept."""
    sc = sidecar_factory(*SIDECAR)
    client = SidecarClient(sc.grpc)
    for bad, fld in ((frame("a", model="m" * 1_000_000), "model"),
                     (frame("b" * 5000), "request_id"),
                     (frame("c", window=2000, dim=4096), "window")):
        err = ingest_error(sc.grpc, [batch([bad])])
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f".{fld}:" in err.details(), err.details()
        assert len(err.details()) < 300  # no echo of the megabyte
    names = [f"d{i}" for i in range(100_000)]
    err = ingest_error(sc.grpc, [batch([frame("d", descriptors=[0.5] * len(names))], names=names)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "descriptor_names" in err.details()
    for rid in ("a", "b" * 5000, "c", "d"):
        assert client.try_report(rid[:200]) is None
    text = scrape(sc.metrics)
    assert len(text) < 200_000 and "mmmmmmmmmm" not in text
    assert metric_value(text, "eigenwatch_state_bytes") < 1 << 20


def test_memory_budget_evicts_and_the_estimate_is_reported(sidecar_factory):
    """Request state is bounded in bytes, not only in count: with --memory-budget-mb 16,
    thousands of requests with full histories keep the estimate under the budget (the
    stalest are evicted, reason "memory"), and the gauges report both."""
    sc = sidecar_factory(*SIDECAR, "--memory-budget-mb", "16", "--max-layers", "64")
    budget = 16 << 20
    frames = [frame(f"r{i}", layer=layer, token_count=16, seed=i) for i in range(1200) for layer in range(4)]
    ingest(sc.grpc, [batch(frames[k:k + 400]) for k in range(0, len(frames), 400)])
    text = scrape(sc.metrics)
    held = metric_value(text, "eigenwatch_state_bytes")
    assert 0 < held <= budget
    assert metric_value(text, "eigenwatch_memory_budget_bytes") == budget
    evicted = metric_value(text, "eigenwatch_requests_evicted_total", reason="memory")
    assert evicted > 100  # 1200 requests x 4 layers x ~25 KB of history do not fit in 16 MiB
    client = SidecarClient(sc.grpc)
    assert client.try_report("r0") is None and client.try_report("r1199") is not None  # the newest stay


def test_calibration_buffers_hold_float32_and_go_when_idle():
    """Per-(model, layer) calibration buffers used to keep whole float64 eigenvalue arrays
    forever. They hold float32, are freed when the layer calibrates, and dropped when idle."""
    det = SpikeDetector(calibration_frames=64, calibration_requests=4)
    eigs, desc = spectrum(1, window=256, dim=512)
    e = np.asarray(eigs, dtype=np.float64)
    for i in range(10):
        det.observe("m", 0, e, 256, 512, desc[SIGMA2], desc[TRACE], request=f"r{i}")
    assert det._collecting[("m", 0)].samples[0][0].dtype == np.float32
    held = det.buffer_bytes
    assert 10 * 256 * 4 <= held < 10 * (256 * 4 + 1024)
    assert det.sweep(idle_s=60) == 0 and det.buffer_bytes == held
    assert det.sweep(idle_s=60, now=time.monotonic() + 61) == 1 and det.buffer_bytes == 0
    assert not det._collecting


def test_drift_state_is_bounded_by_the_calibration_not_by_clients():
    """Per-(model, layer) drift state is never evicted; it needs no eviction because it exists
    only for the pairs --calibration has a drift reference for (fixed at start). Snapshots of
    5,000 other pairs leave nothing behind but counters, and 200 drift excursions on the
    referenced layer keep at most MAX_ALERTS_PER_REQUEST alerts on its stream."""
    from prometheus_client import CollectorRegistry

    from eigenwatch.monitor.calibration import DriftCalibration, LayerDrift
    from eigenwatch.monitor.sidecar.alerts import MAX_ALERTS_PER_REQUEST, AlertHub
    from eigenwatch.monitor.sidecar.drift import DriftMonitor, validate_snapshot
    from eigenwatch.monitor.sidecar.metrics import Metrics

    dim, every = 8, 256
    ref = np.eye(dim)[0]
    cal = DriftCalibration(every=every, sample=1, persist=1,
                           layers={("m", 1): LayerDrift(direction=ref, alert_deg=20.0, clear_deg=10.0)})
    metrics = Metrics(CollectorRegistry())
    mon = DriftMonitor(cal, metrics, AlertHub(metrics))

    def snap(model, layer, direction, seen):
        s = monitor_pb2.DirectionSnapshot(model=model, layer=layer, tokens_seen=seen, window_tokens=every, rows=every,
                                          dim=dim, k=1, directions=np.asarray(direction, "<f4").tobytes())
        assert validate_snapshot(s) is None
        return s

    for i in range(5000):  # pairs with no reference: an angle is never computed, no state is kept
        assert mon.observe(snap(f"m{i % 50}", i, np.eye(dim)[1], every)) is None
    assert set(mon.streams) <= set(cal.layers) and not mon.streams
    for i in range(200):  # away (an alert), back (re-armed), 200 times
        assert mon.observe(snap("m", 1, np.eye(dim)[1], every * (2 * i + 1))) == pytest.approx(90)
        assert mon.observe(snap("m", 1, ref, every * (2 * i + 2))) == pytest.approx(0)
    assert set(mon.streams) == {("m", 1)}
    assert len(mon.streams[("m", 1)].alerts) == MAX_ALERTS_PER_REQUEST
    assert metrics.registry.get_sample_value("eigenwatch_alerts_total", {
        "model": "m", "detector": "drift", "severity": "warning"}) == 200
    assert len(mon._logged) <= 1024  # the once-per-key log lines are capped too


# ---- 2. calibration one client cannot decide -------------------------------------------

def honest(det, n_requests, per_request=8, model="m", layer=0, window=16, dim=64):
    for r in range(n_requests):
        for k in range(per_request):
            eigs, desc = spectrum(1000 * r + k, window, dim)
            det.observe(model, layer, np.asarray(eigs, dtype=np.float64), window, dim, desc[SIGMA2], desc[TRACE],
                        request=f"honest-{r}")


def test_one_request_cannot_set_sigma2():
    """Whoever sent the first --calibration-frames frames of a layer set its sigma2: one
    client sending sigma2 = 1e6 blinded the detector. Impossible values are not learned
    from, one request alone never completes a calibration, and a plausible-but-extreme
    request among honest ones does not move sigma2 or the threshold out of the honest range."""
    refused = []
    det = SpikeDetector(calibration_frames=32, calibration_requests=8)
    det.on_refused = refused.append
    eigs, desc = spectrum(7)
    e = np.asarray(eigs, dtype=np.float64)
    for _ in range(200):  # sigma2 = 1e6 with the window's real trace: impossible
        det.observe("m", 0, e, 16, 64, 1e6, desc[TRACE], request="evil")
    assert set(refused) == {"calibration_impossible"} and ("m", 0) not in det.calibration
    refused.clear()
    big = 0.95 * max_sigma2_rel(16, 64) * desc[TRACE]  # nearly the largest sigma2 any such window can claim
    for _ in range(200):
        det.observe("m", 0, e, 16, 64, big, desc[TRACE], request="evil")
    assert ("m", 0) not in det.calibration, "one request alone calibrated a layer"
    assert refused.count("calibration_request_cap") == 200 - det.per_request_cap

    ref = SpikeDetector(calibration_frames=32, calibration_requests=8)
    honest(ref, 8)
    honest(det, 8)
    clean, poisoned = ref.calibration[("m", 0)], det.calibration[("m", 0)]
    assert poisoned.sigma2 == pytest.approx(clean.sigma2, rel=0.15)
    assert poisoned.spike_threshold <= clean.spike_threshold + 1


def test_poisoned_calibration_over_grpc_keeps_the_detector_sighted(sidecar_factory, tmp_path):
    """End to end: one request id floods a layer with sigma2 = 1e6 frames first; honest
    traffic from 8 requests then calibrates it, and the learned sigma2 (metric and saved
    file) is the honest one."""
    saved = tmp_path / "learned.json"
    sc = sidecar_factory(*SIDECAR, "--calibration-frames", "32", "--save-calibration", str(saved))
    poison = []
    for k in range(64):
        f = frame("evil", token_count=16 * (k + 1), seed=k)
        f.descriptors[SIGMA2] = 1e6
        poison.append(f)
    ingest(sc.grpc, [batch(poison)])
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_calibration_sigma2", model="m", layer="0") == 0
    assert metric_value(text, "eigenwatch_refused_total", reason="calibration_impossible") == 64
    frames = [frame(f"h{r}", token_count=16 * (k + 1), seed=100 * r + k) for r in range(8) for k in range(4)]
    ingest(sc.grpc, [batch(frames)])
    want = float(np.median([np.median([f.descriptors[SIGMA2] / f.descriptors[TRACE] for f in frames[4 * r:4 * r + 4]])
                            for r in range(8)]))
    learned = wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_calibration_sigma2", model="m", layer="0"),
                       what="the layer to calibrate")
    assert learned == pytest.approx(want, rel=1e-6) and learned < 10
    cal = wait_for(lambda: saved.exists() and calib.load(saved), what="the saved calibration")
    assert cal.spike[("m", 0)].sigma2 == pytest.approx(want, rel=1e-6)


def test_restart_merges_learned_layers_with_the_saved_file(sidecar_factory, tmp_path):
    """A restart without --calibration used to overwrite 4 learned layers with the 1 learned
    since. The saved file's layers (and its other sections) are kept; new ones are added."""
    path = tmp_path / "learned.json"
    spike = {("m", layer): calib.LayerCalibration(0.5 + layer, 3, 32, 64) for layer in range(4)}
    calib.save(path, calib.document(spike, tap={"window": 16, "stride": 8, "proj_dim": 0, "layers": [0, 1, 2, 3, 9]}))
    sc = sidecar_factory(*SIDECAR, "--calibration-frames", "4", "--calibration-requests", "4",
                         "--save-calibration", str(path))
    ingest(sc.grpc, [batch([frame(f"r{r}", layer=9, seed=r) for r in range(4)])])
    cal = wait_for(lambda: (c := calib.load(path)) and len(c.spike) == 5 and c, what="the new layer saved")
    for key, c in spike.items():
        assert cal.spike[key].sigma2 == c.sigma2
    assert cal.tap["layers"] == [0, 1, 2, 3, 9]
    assert not [p for p in tmp_path.iterdir() if p.name != "learned.json"]  # no temporary file left


def test_save_calibration_refuses_to_overwrite_a_file_that_is_not_one(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "notes.json"
    path.write_text("my notes, not a calibration")
    out = subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", "sidecar", "--listen", "127.0.0.1:0",
                          "--metrics-port", "-1", "--save-calibration", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--save-calibration" in out.stderr and "Traceback" not in out.stderr
    assert path.read_text() == "my notes, not a calibration"


# ---- 3. fairness -----------------------------------------------------------------------

def test_oversized_report_is_refused_before_it_is_built_and_pages_work(sidecar_factory):
    """A 400-layer request's report (~20 MB) was built on the event loop (0.44 s) and then
    refused by gRPC, on every retry, stalling every other client. It is refused up front
    with a message saying how to page; the layer filter and history limit return parts;
    meanwhile other clients' calls are served."""
    sc = sidecar_factory(*SIDECAR, "--max-layers", "512", "--report-history", "256")
    eigs, desc = spectrum(3)
    steps = [batch([monitor_pb2.Frame(request_id="big", engine_request_id="big-0", model="m", layer=layer, step=t,
                                      token_count=16 * (t + 1), window=16, dim=64, eigenvalues=eigs,
                                      descriptors=desc) for layer in range(400)]) for t in range(256)]
    ingest(sc.grpc, steps, timeout=300)
    client = SidecarClient(sc.grpc)
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        client.report("big", timeout=30)
    refused_in = time.perf_counter() - t0
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "layers" in err.value.details() and "history_limit" in err.value.details()
    part = client.stub.GetReport(monitor_pb2.GetReportRequest(request_id="big", layers=[3, 7]), timeout=30)
    assert [l.layer for l in part.layers] == [3, 7] and len(part.layers[0].history) == 256
    assert [s.token_count for s in part.layers[1].history] == [16 * (t + 1) for t in range(256)]
    short = client.stub.GetReport(monitor_pb2.GetReportRequest(request_id="big", history_limit=4), timeout=30)
    assert len(short.layers) == 400 and [s.token_count for s in short.layers[0].history] == [16 * t for t in
                                                                                              range(253, 257)]
    # A client looping the oversized report, another one ingesting and reading small reports:
    stop = threading.Event()

    def hammer():
        c = SidecarClient(sc.grpc)
        while not stop.is_set():
            try:
                c.report("big", timeout=30)
            except grpc.RpcError:
                pass

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            ingest(sc.grpc, [batch([frame(f"small-{i}", final=True)])], timeout=10)
            assert client.report(f"small-{i}", timeout=10).finished
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_refused_total", reason="report_size") >= 1
    assert refused_in < 10  # generous: refused from the estimate, nothing built


def test_silent_watchers_are_bounded_and_disconnected(sidecar_factory, tmp_path):
    """500 watchers that never read slowed alert fan-out 4x. Now --max-watchers bounds them
    (one more gets RESOURCE_EXHAUSTED), a watcher that takes nothing for --watcher-stall-s
    is disconnected with RESOURCE_EXHAUSTED and its dropped alerts counted, and a reading
    watcher gets every alert meanwhile."""
    cal = write_firing_calibration(tmp_path / "cal.json", "m", layers=range(8))
    sc = sidecar_factory(*SIDECAR, "--calibration", str(cal), "--max-watchers", "2", "--watcher-stall-s", "1",
                         "--persist", "1", "--max-requests", "100000")
    # The silent one announces a tiny receive window and never reads: its writes block at once.
    silent_ch = grpc.insecure_channel(sc.grpc, options=[("grpc.http2.bdp_probe", 0),
                                                         ("grpc.http2.lookahead_bytes", 1024)])
    silent = monitor_pb2_grpc.MonitorStub(silent_ch).WatchAlerts(monitor_pb2.WatchAlertsRequest(), timeout=120)
    reader_ch = grpc.insecure_channel(sc.grpc)
    got = []
    reading = monitor_pb2_grpc.MonitorStub(reader_ch).WatchAlerts(monitor_pb2.WatchAlertsRequest(), timeout=120)
    th = threading.Thread(target=lambda: [got.append(a) for a in reading] if True else None, daemon=True)

    def read():
        try:
            for a in reading:
                got.append(a)
        except grpc.RpcError:
            pass

    th = threading.Thread(target=read, daemon=True)
    th.start()
    wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_alert_watchers") == 2, what="two watchers")
    with grpc.insecure_channel(sc.grpc) as ch:
        third = monitor_pb2_grpc.MonitorStub(ch).WatchAlerts(monitor_pb2.WatchAlertsRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(third)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-watchers" in err.value.details()
    sent = 0
    for k in range(30):  # 8 layers x 64 requests per round, every frame an alert (critical at once)
        ingest(sc.grpc, [batch([frame(f"r{k}-{i}", layer=layer, seed=i) for i in range(64) for layer in range(8)])])
        sent += 64 * 8
        if metric_value(scrape(sc.metrics), "eigenwatch_refused_total", reason="watcher_stalled"):
            break
        time.sleep(0.2)
    wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_refused_total", reason="watcher_stalled") == 1,
             what="the silent watcher disconnected")
    wait_for(lambda: len(got) >= sent, what="every alert at the reading watcher")
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_alert_watchers") == 1
    with pytest.raises(grpc.RpcError) as err:
        for _ in silent:
            pass
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--watcher-stall-s" in err.value.details()
    reading.cancel()
    silent_ch.close()
    reader_ch.close()


def test_batched_watcher_gets_every_alert_in_order_in_few_messages(sidecar_factory, tmp_path):
    """An alert storm (2,048 alerts in four ingest calls): WatchAlertBatches delivers the
    same alerts as WatchAlerts, in the same order, in a handful of messages (each message
    costs the sidecar a write per watcher); a bad filter is refused the same way."""
    cal = write_firing_calibration(tmp_path / "cal.json", "m", layers=range(8))
    sc = sidecar_factory(*SIDECAR, "--calibration", str(cal), "--persist", "1", "--max-requests", "100000")
    plain, batches = [], []
    with grpc.insecure_channel(sc.grpc) as ch:
        stub = monitor_pb2_grpc.MonitorStub(ch)
        calls = (stub.WatchAlerts(monitor_pb2.WatchAlertsRequest(), timeout=120),
                 stub.WatchAlertBatches(monitor_pb2.WatchAlertsRequest(), timeout=120))

        def read(call, out):
            try:
                for m in call:
                    out.append(m)
            except grpc.RpcError:
                pass

        threads = [threading.Thread(target=read, args=(c, o), daemon=True) for c, o in zip(calls, (plain, batches))]
        for t in threads:
            t.start()
        wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_alert_watchers") == 2, what="two watchers")
        for k in range(4):
            ingest(sc.grpc, [batch([frame(f"r{k}-{i}", layer=layer, seed=i) for i in range(64) for layer in range(8)])])
        wait_for(lambda: len(plain) == 2048 and sum(len(b.alerts) for b in batches) == 2048,
                 what="every alert at both watchers")
        flat = [a for b in batches for a in b.alerts]
        key = [(a.request_id, a.layer, a.detector, a.severity) for a in plain]
        assert [(a.request_id, a.layer, a.detector, a.severity) for a in flat] == key
        assert len(batches) <= 64 and all(b.dropped == 0 for b in batches), len(batches)
        with pytest.raises(grpc.RpcError) as err:
            next(stub.WatchAlertBatches(monitor_pb2.WatchAlertsRequest(min_severity=99), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for c in calls:
            c.cancel()


def test_concurrent_ingest_streams_are_limited(sidecar_factory):
    sc = sidecar_factory(*SIDECAR, "--max-streams", "1")
    gate = threading.Event()

    def slow():
        yield batch([frame("a")])
        gate.wait(20)

    with grpc.insecure_channel(sc.grpc) as ch:
        stub = monitor_pb2_grpc.MonitorStub(ch)
        first = stub.Ingest.future(slow(), timeout=30)
        wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_ingest_streams") == 1, what="one open stream")
        err = ingest_error(sc.grpc, [batch([frame("b")])])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams" in err.details()
        gate.set()
        assert first.result().frames_accepted == 1
    assert ingest(sc.grpc, [batch([frame("c")])]).frames_accepted == 1  # the slot is free again


# ---- 5. errors -------------------------------------------------------------------------

def test_garbage_bytes_get_invalid_argument_and_one_log_line(sidecar_factory):
    """Undecodable bytes got UNKNOWN and a traceback each (2,000 tracebacks in one run).
    Every RPC now answers INVALID_ARGUMENT with a short message, and the log has one line
    for the client, not one per message."""
    sc = sidecar_factory(*SIDECAR)
    garbage = b"\xff\xff\xff\xff\x0f" * 4
    with grpc.insecure_channel(sc.grpc) as ch:
        calls = {
            "/eigenwatch.v1.Monitor/GetReport": ch.unary_unary("/eigenwatch.v1.Monitor/GetReport"),
            "/eigenwatch.v1.Shield/Filter": ch.unary_unary("/eigenwatch.v1.Shield/Filter"),
        }
        for _ in range(100):
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as err:
                    call(garbage, timeout=5)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value.code())
                assert len(err.value.details()) < 300
        watch = ch.unary_stream("/eigenwatch.v1.Monitor/WatchAlerts")
        with pytest.raises(grpc.RpcError) as err:
            list(watch(garbage, timeout=5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stream = ch.stream_unary("/eigenwatch.v1.Monitor/Ingest")
        good = batch([frame("g")]).SerializeToString()
        with pytest.raises(grpc.RpcError) as err:
            stream(iter([good, garbage, good]), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "FrameBatch" in err.value.details()
    assert SidecarClient(sc.grpc).report("g").layers  # the frames before the garbage were kept
    time.sleep(0.5)
    log = "\n".join(sc.lines)
    assert "Traceback" not in log
    assert 1 <= log.count("undecodable") <= 4, log[-2000:]  # one per method at most, not one per message
    assert metric_value(scrape(sc.metrics), "eigenwatch_refused_total", reason="undecodable") == 202


def test_client_strings_cannot_forge_log_lines_and_are_cut_in_errors(sidecar_factory, tmp_path):
    """A newline in a model name wrote a forged line into the log; errors echoed client
    input whole. Control characters in labels are refused, and client strings reach logs
    and error messages escaped and shortened."""
    sc = sidecar_factory(*SIDECAR, "--calibration-frames", "2", "--calibration-requests", "2")
    forged = "m\n2099-01-01 00:00:00 ERROR eigenwatch.sidecar: FORGED"
    err = ingest_error(sc.grpc, [batch([frame("x", model=forged)])])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in err.details()
    assert "\n" not in err.details()
    long_model = "é" * 120  # printable, under the limit: accepted, and logged escaped and cut when it calibrates
    ingest(sc.grpc, [batch([frame(f"r{i}", model=long_model, seed=i) for i in range(2)])])
    wait_for(lambda: any("calibrated" in l for l in sc.lines), what="the calibration log line")
    line = next(l for l in sc.lines if "calibrated" in l)
    assert "chars)" in line and long_model not in line
    client = SidecarClient(sc.grpc)
    with pytest.raises(grpc.RpcError) as err:
        client.report("nope\n" + "z" * 10_000)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(err.value.details()) < 300 and "\n" not in err.value.details()
    assert not any(l.startswith("2099-01-01") for l in sc.lines)
