"""Filtered embeddings from the tap (issue: EigenShield item 3), without vLLM:
the tap's pooling (hooks/embeddings.py), the exporter's PooledEmbedding batches,
and a real sidecar filtering them with its --shield and streaming them over
Shield.WatchEmbeddings, with shield_energy alerts on rejected rows. The real
vLLM check is tests/test_vllm_embeddings.py."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch

from eigenwatch.hooks.embeddings import OUTPUT_LAYER, EmbeddingTap, Pooled
from eigenwatch.hooks.export import FrameExporter
from eigenwatch.kernels import shield as S
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc, shield_pb2, shield_pb2_grpc

from conftest import free_port, metric_value, scrape, wait_for

D = 24


def planted(n_rows: int, seed: int) -> np.ndarray:
    v, _ = np.linalg.qr(np.random.default_rng(1234).standard_normal((D, 3)))
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_rows, D)) + (rng.standard_normal((n_rows, 3)) * np.sqrt([49.0, 19.0, 7.0])) @ v.T
    return 3.0 + 0.1 * z


# --------------------------------------------------------------------------- the tap's pooling


def test_layer_source_pools_the_mean_of_a_requests_rows_over_chunks_and_steps():
    tap = EmbeddingTap("2", max_requests=8)
    tap.want("a", "ext-a")
    rng = torch.Generator().manual_seed(0)
    steps = [torch.randn(7, 5, generator=rng, dtype=torch.float64).float() for _ in range(3)]
    # "a": a 4-row prompt chunk, then two decode rows; "b" (did not ask) shares the steps
    tap.add_step({2: steps[0], 1: steps[0] * 9}, [("b", 0, 3), ("a", 3, 7)])
    tap.add_step({2: steps[1]}, [("a", 0, 1), ("b", 1, 2)])
    tap.add_step({2: steps[2]}, [("b", 0, 1), ("a", 1, 2)])
    tap.finish("b")
    assert tap.take() == []  # "b" never asked
    tap.finish("a")
    (p,) = tap.take()
    want = torch.cat([steps[0][3:7], steps[1][0:1], steps[2][1:2]]).double().mean(0).numpy()
    assert (p.request_id, p.engine_request_id, p.layer, p.tokens) == ("ext-a", "a", 2, 6)
    np.testing.assert_allclose(p.vector(), want, rtol=1e-6, atol=1e-7)
    assert not tap.wanted and not tap.sums


def test_a_preempted_request_starts_its_sum_over_and_the_limit_is_counted():
    tap = EmbeddingTap("0", max_requests=1)
    tap.want("a", "a")
    tap.want("b", "b")  # past max_requests: refused, counted
    assert tap.refused == 1 and list(tap.wanted) == ["a"]
    tap.add_step({0: torch.full((2, 3), 5.0)}, [("a", 0, 2)])
    tap.drop("a")  # preempted: recomputed from scratch later
    tap.add_step({0: torch.ones(2, 3)}, [("a", 0, 2)])
    tap.finish("a")
    (p,) = tap.take()
    assert p.tokens == 2 and np.array_equal(p.vector(), np.ones(3, dtype=np.float32))


def test_output_source_reads_vllms_pooler_output_for_requests_that_asked():
    from vllm.v1.outputs import ModelRunnerOutput

    tap = EmbeddingTap("output", max_requests=8)
    tap.want("r1", "ext-1")
    tap.want("r3", "ext-3")
    e1, e2 = torch.arange(4.0), torch.arange(4.0) + 10
    out = ModelRunnerOutput(req_ids=["r1", "r2", "r3"], req_id_to_index={"r1": 0, "r2": 1, "r3": 2},
                            pooler_output=[e1, e2, None])  # r3: a chunked prompt, not finished this step
    tap.on_output(out)
    (p,) = tap.take()
    assert (p.request_id, p.layer, p.tokens) == ("ext-1", OUTPUT_LAYER, 0)
    assert np.array_equal(p.vector(), e1.numpy())
    assert list(tap.wanted) == ["r3"]
    tap.on_output(ModelRunnerOutput(req_ids=["r3"], req_id_to_index={"r3": 0}, pooler_output=[e2]))
    assert [q.request_id for q in tap.take()] == ["ext-3"] and not tap.wanted
    tap.on_output(None)  # a step that returned nothing (async scheduling) is not an error


# --------------------------------------------------------------------------- sidecar: filter and stream


@pytest.fixture(scope="module")
def shield_path(tmp_path_factory):
    x = planted(900, seed=1)
    path = tmp_path_factory.mktemp("emb") / "shield.npz"
    S.save(S.calibrate(S.fit(x[:600]), x[600:]), path)
    return path


def pooled(rid: str, x: np.ndarray, layer: int = OUTPUT_LAYER) -> Pooled:
    return Pooled(rid, "engine-" + rid, layer, torch.from_numpy(np.asarray(x, dtype=np.float32)), 0)


def collect(stub_call, into: list, n: int) -> threading.Thread:
    def run():
        try:
            for item in stub_call:
                into.append(item)
                if len(into) >= n:
                    break
        except grpc.RpcError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sidecar_filters_streams_and_alerts_on_tap_embeddings(sidecar_factory, shield_path):
    sh = S.load(shield_path)
    sc = sidecar_factory("--listen", f"127.0.0.1:{free_port()}", "--metrics-port", "0", "--shield", str(shield_path))
    channel = grpc.insecure_channel(sc.grpc)
    shield = shield_pb2_grpc.ShieldStub(channel)
    monitor = monitor_pb2_grpc.MonitorStub(channel)
    everything, rejected_only, alerts = [], [], []
    calls = [shield.WatchEmbeddings(shield_pb2.WatchEmbeddingsRequest()),
             shield.WatchEmbeddings(shield_pb2.WatchEmbeddingsRequest(rejected_only=True)),
             shield.WatchEmbeddings(shield_pb2.WatchEmbeddingsRequest(model="another-model")),
             monitor.WatchAlerts(monitor_pb2.WatchAlertsRequest(detector="shield_energy"))]
    threads = [collect(calls[0], everything, 2), collect(calls[1], rejected_only, 1),
               collect(calls[3], alerts, 1)]
    wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_embedding_watchers") == 3, what="3 watchers")

    near = sh.mean + 0.01 * np.random.default_rng(5).standard_normal(D)
    off_dir = np.linalg.svd(np.eye(D) - sh.basis @ sh.basis.T)[0][:, 0]  # a direction the shield drops
    far = sh.mean + 3.0 * off_dir
    exporter = FrameExporter(sc.grpc, "m", grams=True)
    try:
        wait_for(lambda: exporter.connected, what="the exporter to connect")
        exporter.submit_embeddings([pooled("near", near), pooled("far", far, layer=3)])
        for t in threads:
            t.join(15)
    finally:
        exporter.close()
    assert [e.request_id for e in everything] == ["near", "far"]
    for e, x in zip(everything, (near, far)):
        want = S.project(sh, np.asarray(x, dtype=np.float32)[None])
        got = np.frombuffer(e.filtered, dtype="<f4")
        np.testing.assert_allclose(got, want.y[0], rtol=1e-6, atol=1e-6)
        assert e.energy == pytest.approx(float(want.energy[0]), rel=1e-6)
        assert e.score == pytest.approx(float(want.score[0]), rel=1e-6)
        assert e.dim == D and e.model == "m" and e.data_sha256 == sh.data_sha256
    assert [e.rejected for e in everything] == [False, True]
    assert [e.request_id for e in rejected_only] == ["far"] and rejected_only[0].layer == 3
    (alert,) = alerts
    assert (alert.request_id, alert.detector, alert.layer) == ("far", "shield_energy", 3)
    assert alert.value == pytest.approx(everything[1].score) and alert.threshold == everything[1].threshold
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_embeddings_total", result="filtered") == 1
    assert metric_value(text, "eigenwatch_embeddings_total", result="rejected") == 1
    assert metric_value(text, "eigenwatch_tap_embeddings_sent_total", model="m") == 2
    # The report of the rejected request holds its alert (its state was made by the embedding)
    rep = monitor.GetReport(monitor_pb2.GetReportRequest(request_id="far"), timeout=5)
    assert [a.detector for a in rep.alerts] == ["shield_energy"]
    for c in calls:
        c.cancel()
    channel.close()


def test_without_a_shield_nothing_is_streamed_and_it_is_counted(sidecar_factory):
    sc = sidecar_factory("--listen", f"127.0.0.1:{free_port()}", "--metrics-port", "0")
    exporter = FrameExporter(sc.grpc, "m", grams=True)
    try:
        wait_for(lambda: exporter.connected, what="the exporter to connect")
        exporter.submit_embeddings([pooled("x", np.ones(D))])
        wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_embeddings_total", result="no_shield") == 1,
                 what="the embedding counted as no_shield")
    finally:
        exporter.close()


def test_malformed_embeddings_are_refused_naming_the_field(sidecar_factory, shield_path):
    sc = sidecar_factory("--listen", f"127.0.0.1:{free_port()}", "--metrics-port", "0", "--shield", str(shield_path))
    channel = grpc.insecure_channel(sc.grpc)
    monitor = monitor_pb2_grpc.MonitorStub(channel)
    good = np.zeros(D, dtype="<f4").tobytes()
    cases = [
        (monitor_pb2.PooledEmbedding(request_id="a", model="m", dim=D, vector=good[:-4]), "embeddings[0].vector"),
        (monitor_pb2.PooledEmbedding(request_id="a", model="m", dim=0, vector=b""), "embeddings[0].dim"),
        (monitor_pb2.PooledEmbedding(request_id="a", model="m", dim=D,
                                     vector=np.full(D, np.nan, dtype="<f4").tobytes()), "NaN"),
    ]
    for emb, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            monitor.Ingest(iter([monitor_pb2.FrameBatch(embeddings=[emb])]), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert words in err.value.details()
    # A dim other than the shield's is not malformed: counted, not streamed, the stream goes on
    other = monitor_pb2.PooledEmbedding(request_id="b", model="m", dim=D + 1, vector=bytes(4 * (D + 1)))
    monitor.Ingest(iter([monitor_pb2.FrameBatch(embeddings=[other])]), timeout=5)
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_embeddings_total", result="dim_mismatch") == 1
    assert metric_value(text, "eigenwatch_embeddings_total", result="invalid") == 3
    channel.close()
