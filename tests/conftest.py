import json
import socket
import time
import urllib.request

import grpc
import pytest

from eigenwatch.monitor.cli.processes import SidecarProcess
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    total, found = 0.0, False
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    return total if found else 0.0


def wait_for(pred, timeout=30.0, every=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def write_firing_calibration(path, model: str, layers, sigma2: float = 1e-4, threshold: int = 0):
    """A calibration whose MP edge sits far below any real spectrum: every
    window has spikes above it, so the spike detector fires on every request."""
    doc = {
        "format": "eigenwatch.calibration/v1",
        "detector": "spectral_spike",
        "models": {model: {str(l): {"sigma2": sigma2, "spike_threshold": threshold} for l in layers}},
    }
    path.write_text(json.dumps(doc))
    return path


class SidecarClient:
    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target)
        self.stub = monitor_pb2_grpc.MonitorStub(self.channel)

    def report(self, request_id: str, timeout=5.0):
        return self.stub.GetReport(monitor_pb2.GetReportRequest(request_id=request_id), timeout=timeout)

    def try_report(self, request_id: str):
        try:
            return self.report(request_id)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def close(self):
        self.channel.close()


@pytest.fixture
def sidecar_factory():
    started = []

    def start(*args: str) -> SidecarProcess:
        sc = SidecarProcess(list(args)).start()
        started.append(sc)
        return sc

    yield start
    for sc in started:
        sc.stop()
