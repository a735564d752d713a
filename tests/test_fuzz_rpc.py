"""Fuzzing every RPC of the sidecar's Monitor and Shield services with hypothesis, over
real gRPC: random bytes, byte-level mutations of valid messages, and structurally valid
messages with hostile field values. No call may crash the sidecar or answer UNKNOWN /
INTERNAL (every refusal has its status), and the sidecar's estimated state stays within
its --memory-budget-mb. A small sample runs here; `bench/bench_fuzz.py` runs >= 10,000
cases per RPC with the same strategies and prints RSS against the budget."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES
from eigenwatch.v1 import monitor_pb2

from conftest import metric_value, scrape

# Status codes a hostile call may get; UNKNOWN and INTERNAL mean a handler raised.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.DEADLINE_EXCEEDED}

_text = st.one_of(st.text(max_size=40), st.sampled_from(["", "m", "r1", "m\nFORGED", "x" * 300]))
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def frames(draw):
    window = draw(st.one_of(st.integers(-2, 40), st.sampled_from([0, 1, 1025, 2**31 - 1])))
    n_eigs = draw(st.one_of(st.just(max(window, 0) if 0 <= window <= 64 else 3), st.integers(0, 70)))
    f = monitor_pb2.Frame(
        request_id=draw(_text), engine_request_id=draw(_text), model=draw(_text),
        layer=draw(st.one_of(st.integers(-3, 40), st.sampled_from([2**31 - 1, -2**31]))),
        step=draw(st.integers(-2**63, 2**63 - 1)), token_count=draw(st.integers(-5, 2**40)),
        skipped_tokens=draw(st.integers(-5, 100)), window=window,
        dim=draw(st.one_of(st.integers(-2, 200), st.sampled_from([2**31 - 1]))),
        eigenvalues=draw(st.lists(_floats, min_size=n_eigs, max_size=n_eigs)),
        descriptors=draw(st.lists(st.floats(allow_nan=True, allow_infinity=True),
                                  min_size=len(DESCRIPTOR_NAMES), max_size=len(DESCRIPTOR_NAMES))),
        final=draw(st.booleans()),
    )
    if draw(st.integers(0, 9)) == 0:  # a centred Gram instead, of any length
        f.ClearField("eigenvalues")
        f.ClearField("descriptors")
        f.centred_gram = draw(st.binary(max_size=4 * 40 * 40))
    return f


@st.composite
def valid_columns(draw, n_names: int):
    """A FrameColumns block that passes every check, with arbitrary finite values: the path that
    stores frames, counts spikes and feeds the risk model gets fuzzed too."""
    m = draw(st.integers(1, 3))
    n = draw(st.integers(1, 6))
    w = draw(st.integers(2, 12))
    ids = st.lists(st.text(alphabet="abcdefgh0123456789-", min_size=1, max_size=12), min_size=m, max_size=m)
    finite = st.floats(0, 1e6, allow_nan=False, width=32)
    eigs = np.sort(np.array(draw(st.lists(finite, min_size=n * w, max_size=n * w)), dtype="<f4").reshape(n, w))
    desc = draw(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=n * n_names, max_size=n * n_names))
    return monitor_pb2.FrameColumns(
        model=draw(st.sampled_from(["m", "m", "bench"])), window=w, request_ids=draw(ids), engine_request_ids=draw(ids),
        skipped_tokens=draw(st.lists(st.integers(0, 50), min_size=m, max_size=m)),
        request=draw(st.lists(st.integers(0, m - 1), min_size=n, max_size=n)),
        layer=draw(st.lists(st.sampled_from([0, 1, 2, 3, 1, 3]), min_size=n, max_size=n)), step=[0] * n,
        # a few token counts half the time, so some requests complete risk-model steps (layers 1 and 3)
        token_count=draw(st.lists(st.integers(0, 10_000) if draw(st.booleans()) else st.sampled_from([16, 32, 48]),
                                  min_size=n, max_size=n)),
        dim=draw(st.lists(st.integers(1, 64), min_size=n, max_size=n)),
        final=draw(st.lists(st.integers(0, n - 1), max_size=2)),
        eigenvalues=eigs[:, ::-1].tobytes(), descriptors=np.asarray(desc, dtype="<f8").tobytes())


@st.composite
def frame_columns(draw, n_names: int):
    """FrameColumns blocks: a third of them valid (valid_columns), the others mostly well-shaped
    (so the per-frame and value checks run), with hostile counts, positions, ids, labels and
    byte lengths."""
    if draw(st.integers(0, 2)) == 0:
        return draw(valid_columns(n_names))
    n = draw(st.integers(0, 6))
    m = draw(st.integers(0, 4))
    window = draw(st.one_of(st.integers(-2, 40), st.sampled_from([0, 1, 1025, 2**31 - 1])))
    w = window if 0 <= window <= 64 else 3
    ids = st.lists(_text, min_size=m, max_size=m)

    def sized(elements, k):  # a list of the right length k, mostly
        j = draw(st.one_of(st.just(k), st.integers(0, 8)))
        return draw(st.lists(elements, min_size=j, max_size=j))

    c = monitor_pb2.FrameColumns(
        model=draw(_text), window=window, request_ids=draw(ids), engine_request_ids=draw(ids),
        skipped_tokens=sized(st.integers(-5, 100), m),
        request=sized(st.integers(0, max(m, 1) + (1 if draw(st.booleans()) else -1)), n),
        layer=draw(st.lists(st.one_of(st.integers(-3, 40), st.sampled_from([2**31 - 1, -2**31])), min_size=n,
                            max_size=n)),
        step=sized(st.just(0), n), token_count=sized(st.integers(-5, 2**40), n),
        dim=sized(st.one_of(st.integers(-2, 200), st.sampled_from([2**31 - 1])), n),
        final=draw(st.lists(st.integers(0, n + 1), max_size=3)))
    if draw(st.integers(0, 4)) == 0:  # centred Grams, of the right size or any
        c.centred_grams = draw(st.one_of(st.just(np.full(n * w * w, 0.5, "<f4").tobytes()),
                                         st.binary(max_size=4 * 40 * 40)))
    else:
        c.eigenvalues = np.asarray(sized(_floats, n * w), dtype="<f4").tobytes()
        c.descriptors = np.asarray(sized(st.floats(allow_nan=True, allow_infinity=True), n * n_names),
                                   dtype="<f8").tobytes()
    return c


@st.composite
def frame_batches(draw):
    names = draw(st.one_of(st.just(list(DESCRIPTOR_NAMES)), st.lists(_text, max_size=30)))
    b = monitor_pb2.FrameBatch(descriptor_names=names, frames=draw(st.lists(frames(), max_size=6)),
                               columns=draw(st.lists(frame_columns(len(names)), max_size=2)))
    if draw(st.booleans()):
        b.stats.CopyFrom(monitor_pb2.TapStats(tap_id=draw(_text), model=draw(_text),
                                              frames_emitted=draw(st.integers(0, 2**64 - 1))))
    if draw(st.integers(0, 4)) == 0:
        b.directions.add(model=draw(_text), layer=draw(st.integers(-2, 50)), dim=draw(st.integers(-1, 64)),
                         k=draw(st.integers(-1, 4)), window_tokens=draw(st.integers(-1, 1000)),
                         directions=draw(st.binary(max_size=1024)))
    return b


def mutated(message_strategy):
    """Valid messages' bytes with a few bytes flipped, cut or appended: mostly undecodable."""
    @st.composite
    def build(draw):
        raw = bytearray(draw(message_strategy).SerializeToString())
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.integers(0, 2))
            if op == 0 and raw:
                raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
            elif op == 1 and raw:
                del raw[draw(st.integers(0, len(raw) - 1)):]
            else:
                raw += draw(st.binary(min_size=1, max_size=8))
        return bytes(raw)
    return build()


def payloads(message_strategy):
    return st.one_of(st.binary(max_size=256), mutated(message_strategy),
                     message_strategy.map(lambda m: m.SerializeToString()))


REPORTS = st.builds(monitor_pb2.GetReportRequest, request_id=_text,
                    layers=st.lists(st.integers(-2**31, 2**31 - 1), max_size=5),
                    history_limit=st.integers(0, 2**32 - 1))
WATCHES = st.builds(monitor_pb2.WatchAlertsRequest, model=_text, detector=_text,
                    min_severity=st.integers(-3, 10))


def shield_strategies(module="shield_pb2", service="Shield"):
    """{method name: (method descriptor, strategy of requests)} of a service without hand-made
    strategies (Shield, Sparse): empty requests, then random and mutated bytes (payloads)."""
    import importlib

    pb2 = importlib.import_module(f"eigenwatch.v1.{module}")
    out = {}
    for m in pb2.DESCRIPTOR.services_by_name[service].methods:
        cls = getattr(pb2, m.input_type.name)
        out[m.name] = (m, st.builds(cls))
    return out


def call_rpc(channel, method: str, kind: str, payload, timeout: float = 5.0) -> grpc.StatusCode:
    """One raw-bytes call; the status it ended with."""
    ident = lambda b: b  # noqa: E731  (raw bytes both ways)
    try:
        if kind == "stream_unary":
            channel.stream_unary(method, ident, ident)(iter(payload), timeout=timeout)
        elif kind == "unary_stream":
            call = channel.unary_stream(method, ident, ident)(payload, timeout=timeout)
            for _ in call:  # a valid watch streams until the deadline: one read is enough
                break
            call.cancel()
        else:
            channel.unary_unary(method, ident, ident)(payload, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code() if exc.code() != grpc.StatusCode.CANCELLED else grpc.StatusCode.OK
    return grpc.StatusCode.OK


def rpc_cases():
    """(method path, kind, strategy of payloads) for every RPC the fuzzer covers."""
    cases = [
        ("/eigenwatch.v1.Monitor/Ingest", "stream_unary",
         st.lists(payloads(frame_batches()), min_size=1, max_size=3)),
        ("/eigenwatch.v1.Monitor/GetReport", "unary_unary", payloads(REPORTS)),
        ("/eigenwatch.v1.Monitor/WatchAlerts", "unary_stream", payloads(WATCHES)),
        ("/eigenwatch.v1.Monitor/WatchAlertBatches", "unary_stream", payloads(WATCHES)),
    ]
    for service, (name, (m, strat)) in [(s, item) for s, mod in (("Shield", "shield_pb2"), ("Sparse", "sparse_pb2"))
                                         for item in shield_strategies(mod, s).items()]:
        kind = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary"}[
            (m.client_streaming, m.server_streaming)]
        cases.append((f"/eigenwatch.v1.{service}/{name}", kind,
                      st.lists(payloads(strat), min_size=1, max_size=2) if kind == "stream_unary" else payloads(strat)))
    return cases


CASES = rpc_cases()


@pytest.fixture(scope="module")
def fuzzed_sidecar(tmp_path_factory):
    from test_sidecar_risk import train_risk_model

    from eigenwatch.monitor.cli.processes import SidecarProcess

    # with a risk model for model "m", layers 1 and 3 (valid_columns sends those): the risk
    # path's gather, pending steps and batched model calls get fuzzed too
    model = tmp_path_factory.mktemp("fuzz") / "risk.onnx"
    train_risk_model(model)
    sc = SidecarProcess(["--listen", "127.0.0.1:0", "--metrics-port", "0", "--memory-budget-mb", "64",
                         "--calibration-frames", "4", "--calibration-requests", "2",
                         "--risk-model", str(model)]).start()
    channel = grpc.insecure_channel(sc.grpc)
    yield sc, channel
    channel.close()
    sc.stop()


def steps_after(sc, rid: str) -> float:
    """Two complete steps of a well-formed request for the risk model; the risk steps scored after them."""
    from test_sidecar_risk import Pool, Request, batch, ingest

    r = Request(rid, [0, 1], Pool(seed=3), seed=4)
    ingest(sc.grpc, [batch(r.frames(0) + r.frames(1))])
    return metric_value(scrape(sc.metrics), "eigenwatch_risk_steps_total", model="m")


@pytest.mark.parametrize("method,kind,strategy", CASES, ids=[c[0].rsplit("/", 1)[1] for c in CASES])
def test_fuzzed_rpc_never_crashes_or_answers_unknown(fuzzed_sidecar, method, kind, strategy):
    sc, channel = fuzzed_sidecar
    if method.endswith("/Ingest"):
        steps_after(sc, "before")  # model "m" admitted and scored before the fuzzer's labels arrive

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(strategy)
    def one(payload):
        code = call_rpc(channel, method, kind, payload, timeout=1.0 if kind == "unary_stream" else 5.0)
        assert code in ALLOWED, f"{method} answered {code}"

    one()
    assert sc.alive(), "the sidecar died"
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_state_bytes") <= 64 << 20
    assert "Traceback" not in "\n".join(sc.lines)
    assert metric_value(text, "eigenwatch_risk_errors_total", model="m") == 0
    if method.endswith("/Ingest"):  # the risk model still scores a well-formed request after all that
        assert steps_after(sc, "after") == metric_value(text, "eigenwatch_risk_steps_total", model="m") + 2
