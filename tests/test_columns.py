"""FrameColumns, the tap's wire form (hooks/frames.batch, proto FrameColumns): a sidecar that
reads frames column by column ends with exactly what the same frames as Frame messages give
(every report, alert, risk step and window metric), and a malformed block is refused naming
its field, while the rest of the batch is kept."""

import grpc
import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict

from conftest import SidecarClient, metric_value, scrape
from eigenwatch.hooks import frames as wire
from eigenwatch.v1 import monitor_pb2
from test_sidecar_risk import MODEL, TAP_LAYERS, Pool, Request, batch, ingest, risk_model, start  # noqa: F401 (a fixture)

pytest.importorskip("onnxruntime")


def as_columns(b: monitor_pb2.FrameBatch) -> monitor_pb2.FrameBatch:
    """The batch's frames as the tap sends them: column by column."""

    def values(w, group):
        return {"eigenvalues": np.array([list(f.eigenvalues) for f in group], dtype="<f4").tobytes(),
                "descriptors": np.array([list(f.descriptors) for f in group], dtype="<f8").tobytes()}

    blocks = wire.column_blocks(MODEL, list(b.frames), [f.window for f in b.frames], values)
    return monitor_pb2.FrameBatch(descriptor_names=b.descriptor_names, columns=blocks)


def scenario():
    """Requests that start, run for different lengths and finish, several per message,
    alerting ones among them (pattern 1: spiked windows), a prefill spanning strides."""
    pool = Pool(seed=4)
    rng = np.random.default_rng(5)
    reqs = [Request(f"c{i}", rng.integers(0, 2, size=int(rng.integers(2, 7))), pool, seed=60 + i) for i in range(6)]
    batches = [batch([f for t in range(2) for f in reqs[0].frames(t)])]  # two token counts in one message
    for t in range(8):
        frames = [f for r in reqs if t < len(r.steps) and (r is not reqs[0] or t >= 2) for f in r.frames(t)]
        frames += [f for r in reqs if t == len(r.steps) for f in r.final()]
        batches.append(batch(frames))
    batches.append(batch([f for r in reqs if len(r.steps) >= 8 for f in r.final()]))
    return reqs, [b for b in batches if b.frames]


def comparable(rep: monitor_pb2.Report) -> dict:
    d = MessageToDict(rep)
    for a in d.get("alerts", []):
        a.pop("time", None)  # wall clock
    return d


def eigenwatch_series(text: str) -> list[str]:
    """The sidecar's own series about frames, spikes, risk and alerts (not time, memory or streams)."""
    keep = ("eigenwatch_frames_ingested", "eigenwatch_spectral_entropy", "eigenwatch_lambda1", "eigenwatch_spikes",
            "eigenwatch_risk", "eigenwatch_request_max_risk", "eigenwatch_alerts", "eigenwatch_requests_total",
            "eigenwatch_frames_rejected")
    return sorted(line for line in text.splitlines() if line.startswith(keep) and "_created" not in line.split()[0])


def test_columns_give_what_frame_messages_give(sidecar_factory, risk_model, tmp_path):
    reqs, batches = scenario()
    cal = tmp_path / "cal.json"  # every window of pattern 1 alerts, at the second frame in a row
    cal.write_text('{"format": "eigenwatch.calibration/v1", "models": {"m": {' +
                   ", ".join(f'"{l}": {{"sigma2": 1.0, "spike_threshold": 1}}' for l in TAP_LAYERS) + "}}}")
    args = ("--calibration", str(cal), "--persist", "2")
    as_frames = start(sidecar_factory, risk_model.path, *args)
    as_cols = start(sidecar_factory, risk_model.path, *args)
    col_batches = [as_columns(b) for b in batches]
    assert all(not b.frames and b.columns for b in col_batches)
    n = sum(len(b.frames) for b in batches)
    assert sum(len(c.layer) for b in col_batches for c in b.columns) == n

    s1, s2 = ingest(as_frames.grpc, batches), ingest(as_cols.grpc, col_batches)
    assert (s1.frames_accepted, s1.frames_rejected) == (s2.frames_accepted, s2.frames_rejected) == (n, 0)
    c1, c2 = SidecarClient(as_frames.grpc), SidecarClient(as_cols.grpc)
    alerts = 0
    for r in reqs:
        r1, r2 = c1.report(r.rid), c2.report(r.rid)
        assert r2.finished and r2.HasField("risk") and r2.risk.steps == len(r.steps)
        assert comparable(r1) == comparable(r2), r.rid
        alerts += len(r2.alerts)
    assert alerts > 0, "the scenario raised no alert: the comparison would not cover them"
    t1, t2 = scrape(as_frames.metrics), scrape(as_cols.metrics)
    assert eigenwatch_series(t1) == eigenwatch_series(t2)
    assert metric_value(t2, "eigenwatch_frames_ingested_total", model=MODEL, layer="2") == n / len(TAP_LAYERS)
    c1.close()
    c2.close()


def good_block() -> monitor_pb2.FrameBatch:
    pool = Pool(seed=6)
    reqs = [Request(f"g{i}", [0, 1], pool, seed=80 + i) for i in range(2)]
    return as_columns(batch([f for r in reqs for t in range(2) for f in r.frames(t)]))


def broken(change):
    b = good_block()
    change(b.columns[0])
    return b


BLOCK_CASES = [  # (change, field, words in the message)
    (lambda c: c.step.append(9), "step", "has 13 values but layer has 12"),
    (lambda c: c.skipped_tokens.append(0), "request_ids", "one each per request"),
    (lambda c: setattr(c, "model", ""), "model", "must not be empty"),
    (lambda c: setattr(c, "model", "m\nFORGED"), "model", "printable"),
    (lambda c: setattr(c, "window", 1), "window", "2..1024"),
    (lambda c: setattr(c, "eigenvalues", c.eigenvalues[:-4]), "eigenvalues", "need"),
    (lambda c: setattr(c, "descriptors", c.descriptors + b"\0" * 8), "descriptors", "float64 [frames × names]"),
    (lambda c: setattr(c, "centred_grams", b"\0" * 16), "centred_grams", "not both"),
    (lambda c: c.engine_request_ids.__setitem__(1, ""), "engine_request_ids", "[1] must not be empty"),
    (lambda c: c.request_ids.__setitem__(0, "x" * 300), "request_ids", "at most 256 characters"),
    (lambda c: c.request.__setitem__(3, 2), "request", "must be < 2, got 2"),
    (lambda c: c.final.append(12), "final", "must be < 12, got 12"),
]


@pytest.mark.parametrize("change,field,words", BLOCK_CASES, ids=[c[1] + str(i) for i, c in enumerate(BLOCK_CASES)])
def test_a_malformed_block_is_refused_naming_the_field_and_the_rest_is_kept(sidecar_factory, risk_model,
                                                                            change, field, words):
    sc = start(sidecar_factory, risk_model.path)
    b = broken(change)
    other = Request("kept", [0], Pool(seed=7), seed=90)
    b.frames.extend(other.frames(0))  # the same message's Frame messages are kept
    with pytest.raises(grpc.RpcError) as err:
        ingest(sc.grpc, [b])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"batch 0: columns[0].{field}" in err.value.details() and words in err.value.details(), err.value.details()
    assert "FORGED" not in err.value.details()
    client = SidecarClient(sc.grpc)
    assert client.report("kept").layers  # kept
    assert client.try_report("g0") is None  # nothing of the malformed block
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_frames_rejected_total", field=field) == 12
    client.close()


def test_bad_frames_of_a_block_are_refused_one_by_one(sidecar_factory, risk_model):
    """Per-frame problems (layer, dim, token_count, values) cost only that frame."""
    sc = start(sidecar_factory, risk_model.path)
    b = good_block()
    c = b.columns[0]
    eigs = np.frombuffer(c.eigenvalues, dtype="<f4").reshape(12, -1).copy()
    eigs[5, 0] = np.nan
    c.eigenvalues = eigs.tobytes()
    c.dim[7] = 0
    c.layer[9] = -1
    with pytest.raises(grpc.RpcError) as err:
        ingest(sc.grpc, [b])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "columns[0].dim[7]: must be 1..1048576, got 0" in err.value.details(), err.value.details()
    client = SidecarClient(sc.grpc)
    frames = sum(lr.frames for r in ("g0", "g1") for lr in client.report(r).layers)
    assert frames == 12 - 3
    text = scrape(sc.metrics)
    for field in ("eigenvalues", "dim", "layer"):
        assert metric_value(text, "eigenwatch_frames_rejected_total", field=field) == 1
    client.close()


def test_a_layer_over_the_label_cap_is_refused_for_the_whole_block(sidecar_factory, risk_model):
    sc = start(sidecar_factory, risk_model.path, "--max-layers", "2")
    b = good_block()  # layers 1, 2 and 3
    with pytest.raises(grpc.RpcError) as err:
        ingest(sc.grpc, [b])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-layers" in err.value.details()
    client = SidecarClient(sc.grpc)
    assert sorted(lr.layer for lr in client.report("g0").layers) == [1, 2]
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_refused_total", reason="layers") == 4
    assert 'layer="3"' not in text  # a refused layer is no series anywhere
    client.close()
