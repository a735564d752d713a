"""A real Prometheus server scrapes the sidecar: the exposition passes
promtool's linter, and the ingested count is queryable through Prometheus."""

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

from conftest import free_port, scrape, wait_for
from test_sidecar import batch, ingest, make_frames

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="Debian's prometheus package is not installed (make test installs it with apt-get)",
)


def query(port: int, expr: str):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def test_prometheus_scrapes_the_sidecar(sidecar_factory, tmp_path):
    sc = sidecar_factory("--listen", "127.0.0.1:0", "--metrics-port", "0", "--calibration-frames", "2")
    frames = make_frames()
    assert ingest(sc.grpc, [batch(frames)]).frames_accepted == len(frames)

    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape(sc.metrics), capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    target = sc.metrics.removeprefix("http://").removesuffix("/metrics")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: eigenwatch\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def ingested():
            try:
                res = query(port, 'sum(eigenwatch_frames_ingested_total{model="m"})')
            except OSError:
                return None
            return res and float(res[0]["value"][1]) == len(frames)

        wait_for(ingested, timeout=60, every=0.5, what="Prometheus to scrape the ingested count")
        up = query(port, 'up{job="eigenwatch"}')
        assert up and up[0]["value"][1] == "1"
        # Histograms arrive as histograms (buckets queryable), and no request id became a label.
        assert query(port, "eigenwatch_spectral_entropy_nats_bucket")
        series = query(port, '{__name__=~"eigenwatch_.*"}')
        assert series and all("request_id" not in s["metric"] for s in series)
    finally:
        proc.terminate()
        proc.wait(10)
