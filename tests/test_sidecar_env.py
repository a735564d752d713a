"""The sidecar installs and serves in an environment holding only its own
dependencies (numpy, grpcio, prometheus-client): no torch, no vLLM. Built
from a wheel of this repo into a fresh virtualenv, so the boundary cannot rot."""

import subprocess
import sys
import venv
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest

from conftest import SidecarClient, metric_value, scrape
from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
SIDECAR_DEPS = ["numpy", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "prometheus-client"]


@pytest.fixture(scope="module")
def sidecar_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sidecar-env")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(REPO)], check=True, cwd=root)
    (wheel,) = wheels.glob("eigenwatch-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    pins = [f"{name}=={version(name)}" for name in SIDECAR_DEPS]  # same versions: served from pip's cache
    subprocess.run([str(py), "-m", "pip", "install", "-q", *pins], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    return env_dir


def test_sidecar_runs_without_torch_or_vllm(sidecar_env):
    py = str(sidecar_env / "bin" / "python")
    cwd = sidecar_env.parent  # not the repo root, whose eigenwatch/ folder would shadow the wheel
    for banned in ("torch", "vllm", "transformers"):
        probe = subprocess.run([py, "-c", f"import {banned}"], capture_output=True, cwd=cwd)
        assert probe.returncode != 0, f"{banned} is importable in the sidecar-only environment"
    check = subprocess.run(
        [py, "-c", "import sys, eigenwatch.monitor.cli, eigenwatch.monitor.server, eigenwatch.monitor.serve, "
                   "eigenwatch.monitor.demo; assert 'torch' not in sys.modules, 'torch imported'"],
        capture_output=True, text=True, cwd=cwd,
    )
    assert check.returncode == 0, check.stderr

    from eigenwatch.monitor.procs import READY

    proc = subprocess.Popen([str(sidecar_env / "bin" / "eigenwatch"), "sidecar", "--listen", "127.0.0.1:0",
                             "--metrics-port", "0", "--calibration-frames", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    try:
        for line in proc.stdout:
            m = READY.search(line)
            if m:
                target, metrics = m.groups()
                break
        else:
            pytest.fail("the sidecar exited before READY")
        frame = monitor_pb2.Frame(
            request_id="x", engine_request_id="x-0123abcd", model="m", layer=0, step=1, token_count=3,
            window=3, dim=4, eigenvalues=[2.0, 1.0, 0.0], descriptors=[0.5] * len(DESCRIPTOR_NAMES), final=True,
        )
        with grpc.insecure_channel(target) as ch:
            summary = monitor_pb2_grpc.MonitorStub(ch).Ingest(
                iter([monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, frames=[frame])]), timeout=10)
        assert summary.frames_accepted == 1
        assert SidecarClient(target).report("x").finished
        assert metric_value(scrape(metrics), "eigenwatch_frames_ingested_total", model="m") == 1
    finally:
        proc.terminate()
        proc.wait(10)
