"""Live EigenTrack risk in the sidecar (`--risk-model`), over real gRPC with a
real onnxruntime model trained here on synthetic descriptor sequences: risk
equal to the offline model on the same x_t, hysteresis alerts, histograms in
/metrics, skips, startup errors."""

import json
import shutil
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

import reference
from conftest import SidecarClient, metric_value, scrape, wait_for
from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES, describe
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

W, D = 16, 24  # window rows and width of the synthetic windows
MODEL = "m"
MODEL_LAYERS = (1, 3)
TAP_LAYERS = (1, 2, 3)  # layer 2 is tapped but not read by the risk model
# The model reads a subset of the descriptors; the taps below send all of them, permuted.
MODEL_NAMES = DESCRIPTOR_NAMES[:15]
WIRE_NAMES = tuple(DESCRIPTOR_NAMES[i] for i in np.random.default_rng(7).permutation(len(DESCRIPTOR_NAMES)))
QUIET = ("--calibration-frames", "100000")  # keep the spectral_spike detector calibrating (no alerts of its own)


def _spectrum(kind: int, rng) -> np.ndarray:
    """Eigenvalues (descending) of a centred W×D window Gram / D: kind 0 i.i.d. noise,
    kind 1 noise plus one strong direction (a spiked window)."""
    x = rng.standard_normal((W, D))
    if kind == 1:
        u = rng.standard_normal(D)
        x += 1.5 * np.sqrt(D) * rng.standard_normal((W, 1)) * u / np.linalg.norm(u)
    xc = x - x.mean(0)
    return np.sort(np.linalg.eigvalsh(xc @ xc.T / D))[::-1].clip(0)


class Pool:
    """Spectra of each kind with their full descriptor vectors (DESCRIPTOR_NAMES order)."""

    def __init__(self, seed: int = 0, n: int = 40):
        rng = np.random.default_rng(seed)
        self.eigs = {k: [_spectrum(k, rng) for _ in range(n)] for k in (0, 1)}
        self.desc = {k: [describe(e, W, D) for e in self.eigs[k]] for k in (0, 1)}
        self.n = n


def model_x(descs: dict[int, np.ndarray]) -> np.ndarray:
    """x_t written out independently of monitor/eigentrack.py: the model's layers ascending,
    each layer's descriptors in the model's name order."""
    pick = [DESCRIPTOR_NAMES.index(n) for n in MODEL_NAMES]
    return np.concatenate([descs[l][pick] for l in MODEL_LAYERS])


def train_risk_model(path, seed: int = 0):
    """A tiny GRU trained with `eigenwatch train`'s code on synthetic sequences:
    label 0 = noise windows at every step, label 1 = spiked windows. Returns the loaded RiskModel."""
    from eigenwatch.monitor.eigentrack import RiskModel
    from eigenwatch.monitor.offline.sequences import Sequences
    from eigenwatch.monitor.offline.train import export_onnx, train_model

    pool = Pool(seed=100 + seed)
    rng = np.random.default_rng(seed)
    xs, labels = [], []
    for i in range(64):
        k = i % 2
        xs.append(np.stack([model_x({l: pool.desc[k][rng.integers(pool.n)] for l in MODEL_LAYERS})
                            for _ in range(int(rng.integers(3, 8)))]))
        labels.append(k)
    seqs = Sequences([str(i) for i in range(64)], np.array(labels), xs, MODEL, MODEL_LAYERS, MODEL_NAMES)
    net, info = train_model(seqs, hidden=8, epochs=30, seed=seed, progress=False)
    assert info["train_auroc"] > 0.95, info
    export_onnx(net, path, {"model": MODEL, "layers": list(MODEL_LAYERS), "descriptor_names": list(MODEL_NAMES)})
    return RiskModel.load(path)


@pytest.fixture(scope="module")
def risk_model(tmp_path_factory):
    return train_risk_model(tmp_path_factory.mktemp("risk") / "risk.onnx")


class Request:
    """Frames of one request whose step t uses windows of kind pattern[t] at every layer.
    steps: [(token_count, {layer: descriptors})]; frames(t) builds step t's frames."""

    def __init__(self, rid: str, pattern, pool: Pool, seed: int, model: str = MODEL, stride: int = 8,
                 names=WIRE_NAMES):
        rng = np.random.default_rng(seed)
        self.rid, self.engine_id, self.model, self.names = rid, f"{rid}-0123abcd", model, tuple(names)
        self.perm = [DESCRIPTOR_NAMES.index(n) for n in self.names]
        self.steps, self.eigs = [], []
        for t, k in enumerate(pattern):
            picks = {l: int(rng.integers(pool.n)) for l in TAP_LAYERS}
            self.steps.append((W + stride * t, {l: pool.desc[k][i] for l, i in picks.items()}))
            self.eigs.append({l: pool.eigs[k][i] for l, i in picks.items()})

    def frame(self, t: int, layer: int, final: bool = False) -> monitor_pb2.Frame:
        count, descs = self.steps[t]
        return monitor_pb2.Frame(
            request_id=self.rid, engine_request_id=self.engine_id, model=self.model, layer=layer, step=t,
            token_count=count, window=W, dim=D, eigenvalues=self.eigs[t][layer].astype(np.float32).tolist(),
            descriptors=descs[layer][self.perm].tolist(), final=final)

    def frames(self, t: int, layers=TAP_LAYERS) -> list:
        return [self.frame(t, l) for l in layers]

    def final(self) -> list:
        """The tap's goodbye: one final frame per layer repeating the last window."""
        return [self.frame(len(self.steps) - 1, l, final=True) for l in TAP_LAYERS]

    def x(self, steps=None) -> np.ndarray:
        return np.stack([model_x(d) for i, (_, d) in enumerate(self.steps) if steps is None or i in steps])


def batch(frames, names=WIRE_NAMES):
    return monitor_pb2.FrameBatch(descriptor_names=names, frames=frames)


def ingest(target, batches, timeout=20):
    with grpc.insecure_channel(target) as ch:
        return monitor_pb2_grpc.MonitorStub(ch).Ingest(iter(batches), timeout=timeout)


def start(sidecar_factory, model_path, *args):
    return sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0", *QUIET,
                           "--risk-model", str(model_path), *args)


def test_live_risk_equals_offline_model_and_fills_metrics(sidecar_factory, risk_model):
    sc = start(sidecar_factory, risk_model.path, "--report-history", "6")
    pool = Pool(seed=1)
    rng = np.random.default_rng(3)
    reqs = [Request(f"r{i}", rng.integers(0, 2, size=int(rng.integers(3, 7))), pool, seed=i) for i in range(5)]
    long = Request("long", [0, 0, 1, 1, 1, 0, 1, 0, 0, 1], pool, seed=50)  # longer than --report-history
    prefill = Request("prefill", [1, 0, 1, 1], pool, seed=51)
    split = Request("split", [0, 1, 1, 0, 1], pool, seed=52)

    batches = []
    # The prefill request's first three token counts arrive in one message (a long
    # prompt spans strides): its steps chain through the state, one model call each.
    batches.append(batch([f for t in range(3) for f in prefill.frames(t)]))
    for t in range(10):
        frames = [f for r in reqs + [long] if t < len(r.steps) for f in r.frames(t)]
        if t < len(split.steps):
            if t == 2:
                frames += split.frames(t, layers=(1, 2))  # layer 3 never comes: step dropped, as offline
            elif t == 3:
                frames += split.frames(t, layers=(1,))  # layer 3 of this step comes with the next message
            elif t == 4:
                frames += split.frames(3, layers=(3,)) + split.frames(t)
            else:
                frames += split.frames(t)
        if t == 0:
            frames += prefill.frames(3)
        frames += [f for r in reqs + [long, split, prefill] if t == len(r.steps) for f in r.final()]
        batches.append(batch(frames))
    batches.append(batch([f for r in reqs + [long, split, prefill] if len(r.steps) >= 10 for f in r.final()]))
    summary = ingest(sc.grpc, batches)
    assert summary.frames_rejected == 0

    client = SidecarClient(sc.grpc)
    n_steps, maxima = 0, []
    expected_steps = {r.rid: list(range(len(r.steps))) for r in reqs + [long, prefill]}
    expected_steps["split"] = [0, 1, 3, 4]
    for r in reqs + [long, prefill, split]:
        keep = expected_steps[r.rid]
        want = risk_model.sequence(r.x(keep))  # the offline path, one sequence at a time
        rep = client.report(r.rid)
        assert rep.finished and rep.HasField("risk")
        risk = rep.risk
        n = min(6, len(keep))
        assert [s.token_count for s in risk.history] == [r.steps[i][0] for i in keep][-n:]
        np.testing.assert_allclose([s.risk for s in risk.history], want[-n:], rtol=0, atol=1e-6)
        assert risk.steps == len(keep)
        assert risk.current == pytest.approx(want[-1], abs=1e-6)
        assert risk.max == pytest.approx(want.max(), abs=1e-6)
        assert list(risk.layers) == list(MODEL_LAYERS) and risk.model_sha256 == risk_model.sha256
        assert (risk.alert_high, risk.clear_low, risk.persist, risk.calibrated) == (0.9, 0.7, 1, False)
        n_steps += len(keep)
        maxima.append(want.max())
        # Descriptor history per layer: the last 6 frames (final frame included), in the wire's name order.
        assert list(rep.descriptor_names) == list(WIRE_NAMES)
        layer1 = next(lr for lr in rep.layers if lr.layer == 1)
        sent = [r.steps[t] for t in range(len(r.steps))] + [r.steps[-1]]
        assert [s.token_count for s in layer1.history] == [c for c, _ in sent][-6:]
        np.testing.assert_allclose([list(s.descriptors) for s in layer1.history],
                                   [d[1][r.perm] for _, d in sent][-6:], rtol=1e-6)

    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_risk_count", model=MODEL) == n_steps
    assert metric_value(text, "eigenwatch_risk_steps_total", model=MODEL) == n_steps
    assert metric_value(text, "eigenwatch_request_max_risk_count", model=MODEL) == len(maxima)
    assert metric_value(text, "eigenwatch_request_max_risk_sum", model=MODEL) == pytest.approx(sum(maxima), abs=1e-5)
    below_half = sum(m <= 0.5 for m in maxima)
    assert metric_value(text, "eigenwatch_request_max_risk_bucket", model=MODEL, le="0.5") == below_half
    # The split request's lonely layer-1 frame at its third token count.
    assert metric_value(text, "eigenwatch_risk_skipped_frames_total", model=MODEL, reason="incomplete") == 1
    assert metric_value(text, "eigenwatch_risk_threshold", model=MODEL, bound="high") == 0.9
    assert metric_value(text, "eigenwatch_risk_errors_total", model=MODEL) == 0
    assert "request_id" not in text and "r1-0123abcd" not in text
    assert any("not calibrated" in line for line in sc.lines), "no warning that the thresholds are uncalibrated"
    promtool = shutil.which("promtool")
    if promtool:  # the risk metrics, with samples, pass Prometheus' own linter
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    client.close()


def test_hysteresis_one_alert_per_excursion(sidecar_factory, risk_model):
    pool = Pool(seed=2)
    # Noise, a spiked run, then spiked/noise alternating (risk swings between the
    # thresholds), a long noise run (risk falls below low), spiked again.
    pattern = [0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 0]
    req = Request("osc", pattern, pool, seed=9)
    r = risk_model.sequence(req.x())
    peaks = [3, 5, 7, 9]  # spiked steps of the first excursion
    dips = [4, 6, 8]  # single noise steps between them
    quiet = 13  # the end of the long noise run
    # Thresholds from the model's own trajectory: peaks above high, dips between, quiet below low.
    assert min(r[peaks]) > max(r[dips]) and min(r[dips]) > r[quiet] and max(r[14:16]) > max(r[dips]), (
        f"the trained model does not give the trajectory this test needs: {np.round(r, 3)}")
    high = float((min(r[peaks]) + max(r[dips])) / 2)
    low = float((min(r[dips]) + r[quiet]) / 2)
    crossings = sum(1 for i in range(3, 10) if r[i] > high >= r[i - 1])
    assert crossings >= 3, f"risk should cross {high:.3f} several times in the first excursion: {np.round(r, 3)}"
    assert min(r[3:10]) > low, "the first excursion never falls below low"
    expected = reference.hysteresis_alerts(r, high, low, 1)
    assert len(expected) == 2 and expected[0] <= 3 and expected[1] > quiet, (expected, np.round(r, 3))

    sc = start(sidecar_factory, risk_model.path, "--risk-high", repr(high), "--risk-low", repr(low))
    got = []
    ch = grpc.insecure_channel(sc.grpc)
    call = monitor_pb2_grpc.MonitorStub(ch).WatchAlerts(monitor_pb2.WatchAlertsRequest(detector="eigentrack"))
    threading.Thread(target=lambda: [got.append(a) for a in _iter(call)], daemon=True).start()
    wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_alert_watchers") == 1, what="the watcher")

    client = SidecarClient(sc.grpc)
    # Up to the end of the first excursion, one message per step, as a tap sends them.
    ingest(sc.grpc, [batch(req.frames(t)) for t in range(10)])
    wait_for(lambda: got, what="the first eigentrack alert")
    rep = client.report("osc")
    assert rep.risk.alerted and len([a for a in rep.alerts if a.detector == "eigentrack"]) == 1
    assert metric_value(scrape(sc.metrics), "eigenwatch_risk_alerted_requests", model=MODEL) == 1
    ingest(sc.grpc, [batch(req.frames(t)) for t in range(10, len(pattern))] + [batch(req.final())])
    wait_for(lambda: len(got) >= 2, what="the second eigentrack alert")
    time.sleep(0.3)

    alerts = [a for a in client.report("osc").alerts if a.detector == "eigentrack"]
    assert len(got) == len(alerts) == 2, "one alert per excursion above high, not one per crossing"
    for a, i in zip(alerts, expected):
        assert a.token_count == req.steps[i][0] and a.value == pytest.approx(r[i], abs=1e-6)
        assert a.threshold == pytest.approx(high) and a.layer == -1 and a.request_id == "osc"
        assert a.severity == monitor_pb2.SEVERITY_WARNING and a.model == MODEL
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_alerts_total", model=MODEL, detector="eigentrack", severity="warning") == 2
    assert metric_value(text, "eigenwatch_risk_alerted_requests", model=MODEL) == 0  # finished
    call.cancel()
    ch.close()

    # --risk-persist 2: the same trajectory, the reference rule's alerts (isolated peaks do not count).
    expected2 = reference.hysteresis_alerts(r, high, low, 2)
    assert expected2 != expected
    sc2 = start(sidecar_factory, risk_model.path, "--risk-high", repr(high), "--risk-low", repr(low),
                "--risk-persist", "2")
    ingest(sc2.grpc, [batch(req.frames(t)) for t in range(len(pattern))])
    alerts2 = [a for a in SidecarClient(sc2.grpc).report("osc").alerts if a.detector == "eigentrack"]
    assert [a.token_count for a in alerts2] == [req.steps[i][0] for i in expected2]
    assert SidecarClient(sc2.grpc).report("osc").risk.persist == 2


def _iter(call):
    try:
        yield from call
    except grpc.RpcError:
        return  # cancelled at the end of the test


def test_other_models_and_missing_descriptors_get_no_risk(sidecar_factory, risk_model):
    sc = start(sidecar_factory, risk_model.path)
    pool = Pool(seed=3)
    other = Request("o", [1, 1], pool, seed=1, model="another-model")
    ingest(sc.grpc, [batch(other.frames(0) + other.frames(1) + other.final())])
    # A tap of another descriptor version: the model's "ratio12" is missing from the batch.
    names = tuple(n for n in DESCRIPTOR_NAMES if n != "ratio12")
    old = Request("v0", [1, 0], pool, seed=2, names=names)
    ingest(sc.grpc, [batch(old.frames(0) + old.frames(1), names=names)])
    good = Request("g", [0, 1], pool, seed=3)
    ingest(sc.grpc, [batch(good.frames(0) + good.frames(1))])

    client = SidecarClient(sc.grpc)
    assert not client.report("o").HasField("risk")
    assert not client.report("v0").HasField("risk")
    assert list(client.report("v0").descriptor_names) == list(names)
    assert client.report("g").risk.steps == 2  # the sidecar scores the next good batch
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_risk_skipped_frames_total", model="another-model",
                        reason="other_model") == 3 * len(TAP_LAYERS)
    assert metric_value(text, "eigenwatch_risk_skipped_frames_total", model=MODEL,
                        reason="descriptor_names") == 2 * len(MODEL_LAYERS)
    assert metric_value(text, "eigenwatch_risk_count", model="another-model") == 0
    assert metric_value(text, "eigenwatch_risk_count", model=MODEL) == 2
    assert metric_value(text, "eigenwatch_frames_ingested_total", model="another-model") == 3 * len(TAP_LAYERS)
    logged = "\n".join(sc.lines)
    assert logged.count("another-model") == 1, "logged once"
    assert "ratio12" in logged


def _plain_onnx(path):
    """A valid ONNX model without eigenwatch metadata (y = x)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _calibration(path, sha, high=0.8, low=0.6, far=0.01):
    path.write_text(json.dumps({
        "format": "eigenwatch.calibration/v1", "detector": "spectral_spike",
        "models": {MODEL: {"1": {"sigma2": 0.5, "spike_threshold": 3}}},
        "risk": {"model_sha256": sha, "alert_high": high, "clear_low": low, "far": far},
    }))
    return path


def _sidecar_exit(*args):
    return subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", "sidecar", "--listen", "127.0.0.1:0",
                           "--metrics-port", "-1", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["missing", "plain_onnx", "not_onnx", "sha_mismatch", "low_above_high",
                                  "cal_low_above_flag_high", "high_without_model", "bad_probability"])
def test_risk_startup_errors_exit_2_naming_the_flag(risk_model, tmp_path, case):
    model = str(risk_model.path)
    args, needle = {
        "missing": (["--risk-model", str(tmp_path / "nope.onnx")], "--risk-model"),
        "plain_onnx": (["--risk-model", str(_plain_onnx(tmp_path / "plain.onnx"))], "eigenwatch metadata"),
        "not_onnx": (["--risk-model", str(_calibration(tmp_path / "json.onnx", "0" * 64))], "not a loadable ONNX"),
        "sha_mismatch": (["--risk-model", model, "--calibration", str(_calibration(tmp_path / "other.json", "ab" * 32))],
                         "risk.model_sha256"),
        "low_above_high": (["--risk-model", model, "--risk-high", "0.5", "--risk-low", "0.6"], "--risk-low"),
        "cal_low_above_flag_high": (["--risk-model", model, "--risk-high", "0.5", "--calibration",
                                     str(_calibration(tmp_path / "matching.json", risk_model.sha256))],
                                    "--calibration risk.clear_low"),
        "high_without_model": (["--risk-high", "0.8"], "--risk-high: needs --risk-model"),
        "bad_probability": (["--risk-model", model, "--risk-high", "1.5"], "--risk-high"),
    }[case]
    out = _sidecar_exit(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "READY" not in out.stdout


def test_calibrated_thresholds_and_flag_override(sidecar_factory, risk_model, tmp_path):
    cal = _calibration(tmp_path / "cal.json", risk_model.sha256, high=0.8, low=0.6, far=0.02)
    pool = Pool(seed=4)
    req = Request("c", [1, 1, 0], pool, seed=4)
    sc = start(sidecar_factory, risk_model.path, "--calibration", str(cal))
    ingest(sc.grpc, [batch(req.frames(t)) for t in range(3)])
    risk = SidecarClient(sc.grpc).report("c").risk
    assert (risk.alert_high, risk.clear_low, risk.calibrated, risk.far) == (0.8, 0.6, True, 0.02)
    assert not any("not calibrated" in line for line in sc.lines)
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_risk_threshold", model=MODEL, bound="low") == 0.6

    sc2 = start(sidecar_factory, risk_model.path, "--calibration", str(cal), "--risk-high", "0.85")
    ingest(sc2.grpc, [batch(req.frames(0))])
    risk = SidecarClient(sc2.grpc).report("c").risk
    assert (risk.alert_high, risk.clear_low, risk.calibrated) == (0.85, 0.6, False)
    assert any("not calibrated" in line for line in sc2.lines)


def test_model_failure_is_counted_and_ingest_goes_on(risk_model, tmp_path):
    """A real onnxruntime error inside the batched call (the session swapped for a graph
    without input 'h'): counted, logged, skipped; the next call scores again."""
    import onnxruntime as ort
    from prometheus_client import CollectorRegistry, generate_latest

    from eigenwatch.monitor.sidecar.risk import LiveRisk, LiveRiskSetup, RiskThresholds
    from eigenwatch.monitor.sidecar.metrics import Metrics
    from eigenwatch.monitor.eigentrack import RiskModel
    from eigenwatch.monitor.sidecar.state import RequestState

    model = RiskModel.load(risk_model.path)  # its own session, so swapping it leaves the fixture's alone
    metrics = Metrics(CollectorRegistry())
    live = LiveRisk(LiveRiskSetup(model, RiskThresholds()), metrics)
    pool = Pool(seed=5)
    req = Request("e", [1, 0, 1], pool, seed=5)
    st = RequestState(req.engine_id, req.rid, MODEL)
    idx = live.batch_index(WIRE_NAMES)

    def step(t):
        for f in req.frames(t):
            live.add(st, f.model, f.layer, f.token_count, np.asarray(f.descriptors, dtype=np.float64), idx)
        live.flush()

    good = model._session
    model._session = ort.InferenceSession(str(_plain_onnx(tmp_path / "plain.onnx")))
    step(0)
    model._session = good
    text = generate_latest(metrics.registry).decode()
    assert metric_value(text, "eigenwatch_risk_errors_total", model=MODEL) == 1
    assert metric_value(text, "eigenwatch_risk_skipped_frames_total", model=MODEL, reason="model_error") == 2
    assert st.risk.steps == 0
    step(1)
    step(2)
    assert st.risk.steps == 2
    # Step 0 was lost, so the state starts at step 1: what the offline model gives for steps 1-2.
    want = model.sequence(req.x([1, 2]))
    np.testing.assert_allclose(st.risk.history.items()[1][:, 0], want, atol=1e-6)


def test_steps_that_wait_for_the_batched_model_call_are_never_lost(risk_model):
    """The sidecar batches the risk model's calls across messages (RISK_FLUSH_S, RISK_FLUSH_REQUESTS):
    a request whose completed steps pile up past MAX_PENDING_STEPS before the call gets them
    scored, not dropped as incomplete. In-process, one stream of one message per step: every
    step waits for the same call unless the timer fires, and the risk equals the offline model's."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from eigenwatch.monitor.sidecar import server
    from eigenwatch.monitor.sidecar.config import SidecarConfig
    from eigenwatch.monitor.sidecar.metrics import Metrics
    from eigenwatch.monitor.sidecar.risk import MAX_PENDING_STEPS, load_live_risk
    from eigenwatch.monitor.spectral_spike import SpikeDetector

    pool = Pool(seed=5)
    rng = np.random.default_rng(11)
    reqs = [Request(f"p{i}", rng.integers(0, 2, size=MAX_PENDING_STEPS + 4), pool, seed=70 + i) for i in range(3)]
    batches = [batch([f for r in reqs for f in r.frames(t)]) for t in range(MAX_PENDING_STEPS + 4)]
    batches.append(batch([f for r in reqs for f in r.final()]))
    cfg = SidecarConfig(risk_model=str(risk_model.path), calibration_frames=100000, report_history=32)

    class Context:
        async def abort(self, code, details):
            raise AssertionError(details)

    async def frames():
        for b in batches:
            yield b

    async def run():
        svc = server.MonitorService(cfg, SpikeDetector(None, 100000), Metrics(CollectorRegistry()),
                                    risk=load_live_risk(cfg, None))
        summary = await svc.Ingest(frames(), Context())
        assert summary.frames_rejected == 0
        return {r.rid: svc.store.get(r.rid).risk for r in reqs}

    got = asyncio.run(run())
    for r in reqs:
        rr = got[r.rid]
        counts, values = rr.history.items()
        assert list(counts) == [c for c, _ in r.steps] and rr.steps == len(r.steps)
        np.testing.assert_allclose(values.ravel(), risk_model.sequence(r.x()), rtol=0, atol=1e-6)
