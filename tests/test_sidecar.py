"""The sidecar over real gRPC and real HTTP: ingest, reports, alerts, metrics,
bad input, and the tap's exporter across sidecar restarts."""

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eigenwatch.hooks.export import FrameExporter
from eigenwatch.hooks.frames import to_proto
from eigenwatch.hooks.windows import WindowTap, to_frames
from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

from conftest import SidecarClient, free_port, metric_value, scrape, wait_for, write_firing_calibration


def make_frames(engine_id="r1-0123abcd", request_id="r1", model="m", layer=1, n_rows=40, d=24, seed=0, stride=8):
    seeds = []
    tap = WindowTap(window=16, stride=stride, max_requests=4, emit=seeds.append)
    tap.begin(engine_id, skipped_tokens=3, external_id=request_id)
    g = torch.Generator().manual_seed(seed)
    tap.add_layer(layer, torch.randn(n_rows, d, generator=g), [(engine_id, 0, n_rows)], step=1)
    tap.finish(engine_id, step=2)
    return [to_proto(f) for f in to_frames(seeds, model)[0]]


def collect(call, out):
    try:
        for a in call:
            out.append(a)
    except grpc.RpcError:
        pass  # cancelled at the end of the test


def ingest(target, batches, timeout=10):
    with grpc.insecure_channel(target) as ch:
        return monitor_pb2_grpc.MonitorStub(ch).Ingest(iter(batches), timeout=timeout)


def batch(frames):
    return monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, frames=frames)


def test_ingest_report_metrics_health_reflection(sidecar_factory):
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0", "--calibration-frames", "4")
    frames = make_frames()
    summary = ingest(sc.grpc, [batch(frames[:3]), batch(frames[3:])])
    assert summary.frames_accepted == len(frames) and summary.frames_rejected == 0

    client = SidecarClient(sc.grpc)
    rep = client.report("r1")  # the client's id
    assert rep.engine_request_id == "r1-0123abcd"
    assert client.report("r1-0123abcd").request_id == "r1"  # or vLLM's engine id
    assert rep.finished and rep.skipped_tokens == 3
    (layer,) = rep.layers
    assert layer.layer == 1 and layer.token_count == 40 and layer.frames == len(frames)
    assert list(rep.descriptor_names) == list(DESCRIPTOR_NAMES)
    np.testing.assert_allclose(layer.last_descriptors, frames[-1].descriptors)

    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_frames_ingested_total", model="m", layer="1") == len(frames)
    assert metric_value(text, "eigenwatch_spectral_entropy_nats_count", model="m", layer="1") == len(frames)
    assert metric_value(text, "eigenwatch_active_requests", model="m") == 0
    assert "request_id" not in text and "r1-0123abcd" not in text  # never a request id as a label

    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "eigenwatch.v1.Monitor"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert "eigenwatch.v1.Monitor" in names and "grpc.health.v1.Health" in names

    with pytest.raises(grpc.RpcError) as err:
        client.report("nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "request_id" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.report("")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
    client.close()


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda f: f.ClearField("request_id"), "request_id"),
        (lambda f: f.descriptors.pop(), "descriptors"),
        (lambda f: f.descriptors.__setitem__(0, float("nan")), "descriptors"),
        (lambda f: f.eigenvalues.__setitem__(1, float("inf")), "eigenvalues"),
        (lambda f: f.eigenvalues.pop(), "eigenvalues"),
        (lambda f: setattr(f, "window", 1), "window"),
    ],
)
def test_malformed_frame_is_invalid_argument_naming_the_field(sidecar_factory, mutate, field):
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0")
    good = make_frames(engine_id="ok-0123abcd", request_id="ok")
    bad = make_frames(engine_id="bad-0123abcd", request_id="bad", seed=1)[0]
    mutate(bad)
    with pytest.raises(grpc.RpcError) as err:
        ingest(sc.grpc, [batch(good[:2] + [bad] + good[2:])])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"frames[2].{field}" in err.value.details()
    # The valid frames of that batch were kept, and the sidecar serves on.
    client = SidecarClient(sc.grpc)
    assert client.report("ok").layers[0].frames == len(good)
    other = make_frames(engine_id="next-0123abcd", request_id="next", seed=2)
    assert ingest(sc.grpc, [batch(other)]).frames_accepted == len(other)
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_frames_rejected_total", field=field) == 1
    client.close()


def test_batch_without_required_descriptor_names_is_rejected(sidecar_factory):
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "-1")
    frames = make_frames()
    with pytest.raises(grpc.RpcError) as err:
        ingest(sc.grpc, [monitor_pb2.FrameBatch(descriptor_names=["lambda1"], frames=frames)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "descriptor_names" in err.value.details() and "sigma2" in err.value.details()


def test_watch_alerts_filters_and_calibration_file(sidecar_factory, tmp_path):
    cal = write_firing_calibration(tmp_path / "cal.json", "m", layers=[1])
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0", "--calibration", str(cal))
    got, other = [], []
    ch = grpc.insecure_channel(sc.grpc)
    stub = monitor_pb2_grpc.MonitorStub(ch)
    call = stub.WatchAlerts(monitor_pb2.WatchAlertsRequest(model="m", min_severity=monitor_pb2.SEVERITY_WARNING))
    call_other = stub.WatchAlerts(monitor_pb2.WatchAlertsRequest(model="another-model"))
    threading.Thread(target=collect, args=(call, got), daemon=True).start()
    threading.Thread(target=collect, args=(call_other, other), daemon=True).start()
    wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_alert_watchers") == 2, what="watchers")

    ingest(sc.grpc, [batch(make_frames())])
    wait_for(lambda: got, what="an alert")
    a = got[0]
    assert a.request_id == "r1" and a.detector == "spectral_spike" and a.layer == 1
    assert a.severity >= monitor_pb2.SEVERITY_WARNING and a.value > a.threshold
    time.sleep(0.3)
    assert len(got) <= 2, "one alert per request/layer/severity level, not one per frame"
    assert other == []
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_alerts_total", model="m", detector="spectral_spike") == len(got)
    assert metric_value(text, "eigenwatch_calibration_sigma2", model="m", layer="1") == pytest.approx(1e-4)
    assert SidecarClient(sc.grpc).report("r1").alerts[0].detector == "spectral_spike"
    call.cancel()
    call_other.cancel()
    ch.close()


def test_bad_watch_filter_and_bad_calibration_file(sidecar_factory, tmp_path):
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "-1")
    with grpc.insecure_channel(sc.grpc) as ch:
        call = monitor_pb2_grpc.MonitorStub(ch).WatchAlerts(monitor_pb2.WatchAlertsRequest(min_severity=42))
        with pytest.raises(grpc.RpcError) as err:
            next(iter(call))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "min_severity" in err.value.details()

    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "eigenwatch.calibration/v1", "models": {"m": {"1": {"sigma2": -1, "spike_threshold": 0}}}}')
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", "sidecar", "--calibration", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "models.m.1.sigma2" in (out.stderr + out.stdout)


def test_exporter_drops_while_sidecar_is_away_and_reconnects(sidecar_factory):
    port = free_port()
    target = f"127.0.0.1:{port}"
    exporter = FrameExporter(target, "m", max_batches=8)
    try:
        # No sidecar yet: submit never blocks or raises; frames are dropped and counted.
        t0 = time.monotonic()
        seeds = []
        tap = WindowTap(16, 8, 100, seeds.append)
        for i in range(20):
            tap.begin(f"a{i}-0123abcd")
            tap.add_layer(1, torch.randn(16, 8), [(f"a{i}-0123abcd", 0, 16)], 1)
            exporter.submit(seeds[:])
            seeds.clear()
        assert time.monotonic() - t0 < 1.0
        wait_for(lambda: exporter.stats()["frames_dropped"] >= 20, what="drops while the sidecar is away")

        sc = sidecar_factory("--listen", target, "--metrics-port", "0")
        wait_for(lambda: exporter.connected, what="reconnect")
        tap.begin("b-0123abcd", external_id="b")
        tap.add_layer(1, torch.randn(16, 8), [("b-0123abcd", 0, 16)], 2)
        tap.finish("b-0123abcd", 3)
        exporter.submit(seeds[:])
        seeds.clear()
        client = SidecarClient(sc.grpc)
        wait_for(lambda: client.try_report("b"), what="frames after reconnect")
        # The tap's drop counter reaches Prometheus through the stream's stats.
        wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_tap_frames_dropped_total", model="m") >= 20,
                 timeout=15, what="tap drop counter in /metrics")

        # Kill it (no goodbye), frames drop again; a new sidecar on the same port gets frames.
        sc.kill()
        wait_for(lambda: not exporter.connected, what="disconnect")
        before = exporter.stats()["frames_dropped"]
        tap.begin("c-0123abcd")
        tap.add_layer(1, torch.randn(16, 8), [("c-0123abcd", 0, 16)], 4)
        exporter.submit(seeds[:])
        seeds.clear()
        wait_for(lambda: exporter.stats()["frames_dropped"] > before, what="drops after kill")
        sc2 = sidecar_factory("--listen", target, "--metrics-port", "-1")
        wait_for(lambda: exporter.connected, what="reconnect after restart")
        tap.begin("d-0123abcd", external_id="d")
        tap.add_layer(1, torch.randn(16, 8), [("d-0123abcd", 0, 16)], 5)
        exporter.submit(seeds[:])
        client2 = SidecarClient(sc2.grpc)
        wait_for(lambda: client2.try_report("d"), what="frames after restart")
    finally:
        exporter.close(timeout=1)


def test_bearer_token_guards_the_monitor_service_not_health(sidecar_factory, monkeypatch):
    monkeypatch.setenv("EIGENWATCH_TOKEN", "s3cret")
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "-1")
    frames = make_frames()
    with grpc.insecure_channel(sc.grpc) as ch:
        stub = monitor_pb2_grpc.MonitorStub(ch)
        for call in (lambda md: stub.Ingest(iter([batch(frames)]), metadata=md, timeout=10),
                     lambda md: stub.GetReport(monitor_pb2.GetReportRequest(request_id="r1"), metadata=md, timeout=5),
                     lambda md: next(iter(stub.WatchAlerts(monitor_pb2.WatchAlertsRequest(), metadata=md, timeout=1)))):
            for md in (None, (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as err:
                    call(md)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "authorization" in err.value.details()
        good = (("authorization", "Bearer s3cret"),)
        assert stub.Ingest(iter([batch(frames)]), metadata=good, timeout=10).frames_accepted == len(frames)
        assert stub.GetReport(monitor_pb2.GetReportRequest(request_id="r1"), metadata=good).finished
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    # The tap's exporter sends the token from the same variable.
    exporter = FrameExporter(sc.grpc, "m")
    try:
        seeds = []
        tap = WindowTap(16, 8, 4, seeds.append)
        tap.begin("t-0123abcd", external_id="t")
        tap.add_layer(1, torch.randn(16, 8), [("t-0123abcd", 0, 16)], 1)
        tap.finish("t-0123abcd", 2)
        exporter.submit(seeds)
        client = grpc.insecure_channel(sc.grpc)
        stub = monitor_pb2_grpc.MonitorStub(client)
        wait_for(lambda: _found(stub, "t", good), what="frames sent with the token")
        client.close()
    finally:
        exporter.close(timeout=1)


def _found(stub, rid, md):
    try:
        return stub.GetReport(monitor_pb2.GetReportRequest(request_id=rid), metadata=md, timeout=5).finished
    except grpc.RpcError:
        return False


@pytest.mark.parametrize("flag", ["--listen", "--metrics-port"])
def test_port_in_use_is_a_clear_error_naming_the_flag(flag):
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = (["--listen", f"127.0.0.1:{port}", "--metrics-port", "-1"] if flag == "--listen"
                else ["--listen", "127.0.0.1:0", "--metrics-port", str(port)])
        out = subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", "sidecar", *args],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert f"eigenwatch sidecar: {flag}: could not" in out.stderr
    assert "Traceback" not in out.stderr


def _seeds(n_requests=3, layers=(1, 2), rows=45, d=24, seed=0):
    """A few requests × layers through the tap's windows (a large common mean,
    prefill rows), as FrameSeeds."""
    seeds = []
    tap = WindowTap(16, 8, 8, seeds.append)
    g = torch.Generator().manual_seed(seed)
    for r in range(n_requests):
        eid = f"g{r}-0123abcd"
        tap.begin(eid, external_id=f"g{r}")
        x = {l: torch.randn(rows, d, generator=g) * (1 + l) + 50.0 for l in layers}
        tap.add_step(x, [(eid, 0, rows)], 1)
        tap.finish(eid, 2)
    return seeds


def test_gram_frames_get_the_tap_spectra_in_the_sidecar(sidecar_factory):
    """Frames that carry their centred Gram (TapConfig.spectra=sidecar): the
    sidecar computes eigenvalues and descriptors, and a request's report shows
    what the tap itself would have computed (to_frames) for the same windows."""
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0")
    seeds = _seeds()
    want, failed = to_frames(seeds, "m")
    assert not failed
    exporter = FrameExporter(sc.grpc, "m", grams=True)
    try:
        exporter.submit(seeds)
        client = SidecarClient(sc.grpc)
        for r in range(3):
            wait_for(lambda: (rep := client.try_report(f"g{r}")) is not None and rep.finished, what=f"report g{r}")
            rep = client.report(f"g{r}")
            for lr in rep.layers:
                mine = [f for f in want if f.request_id == f"g{r}" and f.layer == lr.layer]
                assert lr.frames == len(mine) and lr.window == mine[-1].window == 16 and lr.dim == 24
                np.testing.assert_allclose(lr.last_eigenvalues, mine[-1].eigenvalues, rtol=1e-5,
                                           atol=1e-6 * mine[-1].eigenvalues[0])
                np.testing.assert_allclose(lr.last_descriptors, mine[-1].descriptors, rtol=1e-4, atol=1e-7)
                hist = np.array([list(h.descriptors) for h in lr.history])
                np.testing.assert_allclose(hist, np.stack([f.descriptors for f in mine]), rtol=1e-4, atol=1e-7)
        assert exporter.stats()["frames_sent"] == len(seeds)
        # the last message's stats count its own frames: the tap's sent total is what the sidecar took
        # (read as soon as the reports are in, before any idle stats message could correct it)
        assert metric_value(scrape(sc.metrics), "eigenwatch_tap_frames_sent_total", model="m") == len(seeds)
        # window metrics reach /metrics within the sidecar's WINDOW_FLUSH_S of their frame
        wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_frames_ingested_total", model="m", layer="1")
                 == len(want) / 2, what="frames on /metrics")
    finally:
        exporter.close(timeout=1)


def test_gram_frames_are_cut_into_batches_under_the_message_limit(monkeypatch):
    from eigenwatch.hooks import export

    monkeypatch.setattr(export, "BATCH_GRAM_BYTES", 3000)  # 16×16 Grams are 1 KiB each
    exporter = FrameExporter("127.0.0.1:1", "m", grams=True)
    try:
        seeds = _seeds()
        batches = exporter._batches(seeds)
        # every seed (no signature, no hidden-state statistics) goes column by column
        assert all(not b.frames for b in batches)
        size = [sum(len(c.centred_grams) for c in b.columns) for b in batches]
        assert len(batches) > 3 and all(3000 <= n < 3000 + 1024 for n in size[:-1]) and size[-1] < 3000 + 1024
        assert sum(len(c.layer) for b in batches for c in b.columns) == len(seeds)
        c = batches[0].columns[0]
        assert len(c.centred_grams) == 4 * len(c.layer) * c.window**2 and not c.eigenvalues and not c.descriptors
    finally:
        exporter.close(timeout=0.1)


def test_bad_gram_frames_name_the_field_and_unusable_windows_are_counted(sidecar_factory):
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0")
    good = [monitor_pb2.Frame(  # Frame messages with their Gram, as a client other than the tap may send
        request_id=s.request_id, engine_request_id=s.engine_request_id, model="m", layer=s.layer, step=s.step,
        token_count=s.token_count, window=s.valid, dim=s.dim, final=s.final,
        centred_gram=(s.gram.numpy()[:s.valid, :s.valid] * np.float32(s.scale)).astype("<f4").tobytes())
        for s in _seeds(n_requests=1, layers=(1,))]

    def variant(change):
        f = monitor_pb2.Frame()
        f.CopyFrom(good[0])
        change(f)
        return f

    cases = [
        (lambda f: setattr(f, "centred_gram", f.centred_gram[:-4]), "centred_gram", "has 252 bytes but window 8 needs 256"),
        (lambda f: f.eigenvalues.extend([1.0] * f.window), "centred_gram", "not both"),
        (lambda f: setattr(f, "window", 2000), "window", "at most 1024"),
    ]
    for change, field, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            ingest(sc.grpc, [batch([variant(change)])])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"frames[0].{field}" in err.value.details() and words in err.value.details(), err.value.details()
    # A window of NaN activations is not malformed: counted, the stream and the batch's other frames go on.
    nan = variant(lambda f: setattr(f, "centred_gram", np.full((f.window, f.window), np.nan, "<f4").tobytes()))
    nan.request_id, nan.engine_request_id = "nan", "nan-0123abcd"
    summary = ingest(sc.grpc, [batch([nan] + good)])
    assert summary.frames_accepted == len(good) and summary.frames_rejected == 0
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_windows_unusable_total", model="m", reason="nonfinite") == 1
    assert metric_value(text, "eigenwatch_frames_rejected_total", field="centred_gram") == 2


def test_sidecar_yields_the_cpu_to_the_server_it_watches(sidecar_factory):
    """By default the sidecar lowers its priority by 10 (on shared cores vLLM
    comes first); --nice 0 keeps the parent's; a bad value names the flag."""
    import os
    import subprocess
    import sys

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    default = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "-1")
    kept = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "-1", "--nice", "0")
    assert os.getpriority(os.PRIO_PROCESS, default.proc.pid) == min(19, mine + 10)
    assert os.getpriority(os.PRIO_PROCESS, kept.proc.pid) == mine
    out = subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", "sidecar", "--nice", "-5"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--nice: expected an integer 0..19, got '-5'" in out.stderr


def test_steps_queued_while_a_message_went_out_travel_together(monkeypatch):
    """The exporter merges the steps already waiting in its queue into one FrameBatch (never
    waits for more), up to MERGE_SEEDS frames; every frame is sent once, in order."""
    from eigenwatch.hooks import export

    exporter = FrameExporter("127.0.0.1:1", "m", grams=True)
    exporter.close(timeout=1)  # its thread is gone: this test drives the sending generator itself
    exporter._stop.clear()
    steps = [_seeds(n_requests=2, layers=(1,), seed=k) for k in range(3)]
    for k, seeds in enumerate(steps):  # each step's requests its own
        for s in seeds:
            s.engine_request_id, s.request_id = f"{k}{s.engine_request_id}", f"{k}{s.request_id}"
    for seeds in steps:
        exporter.submit(seeds)

    def sent(batch):
        return [(c.engine_request_ids[r], c.token_count[i], c.step[i]) for c in batch.columns
                for i, r in enumerate(c.request)]

    def in_token_order(frames):  # per request (one layer here): token counts ascending, as the tap made them
        ids = {e for e, _, _ in frames}
        return all([c for e2, c, _ in frames if e2 == e] == sorted(c for e2, c, _ in frames if e2 == e) for e in ids)

    want = [(s.engine_request_id, s.token_count, s.step) for seeds in steps for s in seeds]
    gen = exporter._requests(exporter._generation)
    msg = next(gen)
    got = sent(msg)
    assert sorted(got) == sorted(want) and exporter._queue.empty()
    assert msg.stats.frames_sent == len(want)  # its stats count its own frames
    assert in_token_order(got) and len({w for w in (s.valid for seeds in steps for s in seeds)}) > 1

    monkeypatch.setattr(export, "MERGE_SEEDS", len(steps[0]) + 1)  # room for one more step, not two
    for seeds in steps:
        exporter.submit(seeds)
    gen = exporter._requests(exporter._generation)
    first, second = sent(next(gen)), sent(next(gen))
    cut = 2 * len(steps[0])
    assert sorted(first) == sorted(want[:cut]) and sorted(second) == sorted(want[cut:])
    exporter._stop.set()
