"""CALIB.json (monitor/calibration.py): checked load with errors that name the
key, atomic save, the sidecar's --save-calibration written off its event loop
and never torn (readers during the writes, then SIGKILL mid-stream), and the
tap-settings check: frames of another width than the calibration's are
refused with FAILED_PRECONDITION, not compared silently."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
import pytest

from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES
from eigenwatch.monitor import calibration as calib
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

from conftest import metric_value, scrape, wait_for
from test_sidecar import make_frames

LAYER = {"sigma2": 0.5, "spike_threshold": 3}


def write(path, doc):
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("doc, needle", [
    ({"format": "other"}, "'format' must be"),
    ({"format": calib.FORMAT, "models": {}}, "'models' must map"),
    ({"format": calib.FORMAT, "models": {"m": {"x": LAYER}}}, "models.m.x: layer must be an integer"),
    ({"format": calib.FORMAT, "models": {"m": {"1": {"sigma2": 0, "spike_threshold": 1}}}}, "models.m.1.sigma2"),
    ({"format": calib.FORMAT, "models": {"m": {"1": {"sigma2": 1, "spike_threshold": -1}}}},
     "models.m.1.spike_threshold"),
    ({"format": calib.FORMAT, "models": {"m": {"1": dict(LAYER, dim=2.5)}}}, "models.m.1.dim"),
    ({"format": calib.FORMAT, "models": {"m": {"1": LAYER}}, "tap": {"window": 1, "stride": 1, "proj_dim": 0,
                                                                    "layers": []}}, "tap.window"),
    ({"format": calib.FORMAT, "models": {"m": {"1": LAYER}}, "risk": {"model_sha256": "ab"}}, "risk.model_sha256"),
    ({"format": calib.FORMAT, "models": {"m": {"1": LAYER}},
      "risk": {"model_sha256": "a" * 64, "alert_high": 1.5, "clear_low": 0.1, "far": 0.01}}, "risk.alert_high"),
])
def test_load_errors_name_the_flag_file_and_key(tmp_path, doc, needle):
    path = write(tmp_path / "c.json", doc)
    with pytest.raises(calib.CalibrationError) as err:
        calib.load(path)
    assert needle in str(err.value) and str(err.value).startswith(f"--calibration: {path}")


def test_load_errors_for_missing_and_broken_files(tmp_path):
    with pytest.raises(calib.CalibrationError, match="no such file"):
        calib.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(calib.CalibrationError, match="is not JSON"):
        calib.load(tmp_path / "bad.json", flag="--x")
    sidecar_only = write(tmp_path / "s.json", {"format": calib.FORMAT, "models": {"m": {"1": LAYER}}})
    cal = calib.load(sidecar_only)
    assert cal.tap is None and cal.risk is None and cal.spike[("m", 1)].dim == 0  # older files still load
    with pytest.raises(calib.CalibrationError, match="not written by `eigenwatch calibrate`"):
        cal.require_offline()


def test_document_round_trips_and_save_is_atomic(tmp_path):
    spike = {("m", 2): calib.LayerCalibration(0.4, 5, 100, 64), ("m", 1): calib.LayerCalibration(0.5, 3)}
    tap = {"window": 32, "stride": 16, "proj_dim": 64, "layers": [1, 2]}
    path = tmp_path / "deep" / "c.json"
    calib.save(path, calib.document(spike, tap=tap, risk=None))
    cal = calib.load(path)
    assert cal.spike == spike and cal.tap == tap and cal.risk is None
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]  # no temporary file left behind
    # a failed write leaves the old file intact and no temporary file
    with pytest.raises(TypeError):
        calib.save(path, {"format": calib.FORMAT, "models": {"m": {"1": object()}}})
    assert calib.load(path).spike == spike
    assert [p.name for p in path.parent.iterdir()] == ["c.json"]


def _frame(model: str, layer: int, rid: str, token_count: int, dim: int = 16):
    eigs = [4.0, 2.0, 1.0, 0.5, 0.25, 0.0]
    desc = [0.0] * len(DESCRIPTOR_NAMES)
    desc[DESCRIPTOR_NAMES.index("sigma2")] = 0.6
    desc[DESCRIPTOR_NAMES.index("trace_mean")] = 1.55
    return monitor_pb2.Frame(request_id=rid, engine_request_id=rid + "-0123abcd", model=model, layer=layer, step=1,
                             token_count=token_count, window=len(eigs), dim=dim, eigenvalues=eigs, descriptors=desc)


def test_save_calibration_is_never_torn_even_when_killed(sidecar_factory, tmp_path):
    """Layers of up to 3000 models calibrate one after another, each rewriting the
    whole file (it grows by ~80 bytes a layer): readers polling it meanwhile and the file left
    by SIGKILL in the middle of the stream are always whole, parseable
    calibrations, never a truncated write."""
    path = tmp_path / "learned.json"
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "-1", "--calibration-frames", "2",
                         "--save-calibration", str(path), "--max-models", "3000", "--max-layers", "12000")
    torn, seen, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            try:
                doc = json.loads(text)
                assert doc["format"] == calib.FORMAT and doc["models"]
                seen.append(sum(len(layers) for layers in doc["models"].values()))
            except (ValueError, AssertionError, KeyError):
                torn.append(len(text))

    def batches():
        for m in range(3000):
            frames = [_frame(f"model-{m:04d}", layer, f"r{m}-{k}", 16 * (k + 1)) for layer in range(4) for k in range(2)]
            yield monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, frames=frames)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    with grpc.insecure_channel(sc.grpc) as ch:
        stub = monitor_pb2_grpc.MonitorStub(ch)
        call = stub.Ingest.future(batches(), timeout=60)
        wait_for(lambda: len(set(seen)) >= 10, timeout=60, what="ten saved versions")
        os.kill(sc.proc.pid, signal.SIGKILL)  # in the middle of the stream and its writes
        sc.proc.wait(10)
        with pytest.raises(grpc.RpcError):
            call.result()
    stop.set()
    for t in threads:
        t.join(5)
    assert not torn, f"readers saw {len(torn)} torn file(s), sizes {torn[:5]}"
    assert max(seen) < 12000, "the kill came after the last layer calibrated: nothing was cut short"
    last = calib.load(path)  # what the kill left behind: whole
    assert len(last.spike) >= max(seen) and all(c.frames == 2 and c.dim == 16 for c in last.spike.values())
    assert not [p for p in tmp_path.iterdir() if p.name != "learned.json" and not p.name.endswith(".tmp")]


def test_frames_of_another_width_than_calibrated_are_refused(sidecar_factory, tmp_path):
    """A calibration records each layer's width (dim: d, or k with
    EIGENWATCH_PROJ_DIM). Frames of another width are refused, loudly, while
    the other layers' frames are accepted."""
    cal = write(tmp_path / "c.json", {"format": calib.FORMAT, "models": {"m": {
        "1": dict(LAYER, dim=64), "2": dict(LAYER, dim=24)}}, "tap": {"window": 16, "stride": 8, "proj_dim": 64,
                                                                      "layers": [1, 2]}})
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0", "--calibration", str(cal))
    frames = make_frames(layer=2, d=24) + make_frames(engine_id="r2-0123abcd", request_id="r2", layer=1, d=24)
    with grpc.insecure_channel(sc.grpc) as ch:
        stub = monitor_pb2_grpc.MonitorStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Ingest(iter([monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, frames=frames)]), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        msg = err.value.details()
        assert "dim" in msg and "layer 1" in msg and "width 24" in msg and "width 64" in msg
        assert "EIGENWATCH_PROJ_DIM" in msg
        rep = stub.GetReport(monitor_pb2.GetReportRequest(request_id="r1"), timeout=5)
        assert [l.layer for l in rep.layers] == [2]  # the matching layer's frames were kept
        with pytest.raises(grpc.RpcError):
            stub.GetReport(monitor_pb2.GetReportRequest(request_id="r2"), timeout=5)  # nothing of r2 recorded
    text = scrape(sc.metrics)
    n_bad = sum(1 for f in frames if f.layer == 1)
    assert metric_value(text, "eigenwatch_frames_rejected_total", field="dim") == n_bad


def test_tap_opted_out_count_is_a_gauge(sidecar_factory):
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0")
    stats = [monitor_pb2.TapStats(tap_id="t1", model="m", requests_opted_out=n, frames_emitted=e)
             for n, e in ((5, 10), (2, 20))]
    with grpc.insecure_channel(sc.grpc) as ch:
        stub = monitor_pb2_grpc.MonitorStub(ch)
        for st in stats:  # the live count goes down: a gauge, not a counter
            stub.Ingest(iter([monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, stats=st)]), timeout=10)
    text = scrape(sc.metrics)
    assert "# TYPE eigenwatch_tap_requests_opted_out gauge" in text
    assert "eigenwatch_tap_requests_opted_out_total" not in text
    assert metric_value(text, "eigenwatch_tap_requests_opted_out", model="m") == 2
    assert metric_value(text, "eigenwatch_tap_frames_emitted_total", model="m") == 20
