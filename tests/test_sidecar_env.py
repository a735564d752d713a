"""The sidecar installs and serves in an environment holding only its own
dependencies (numpy, grpcio, prometheus-client, onnxruntime): no torch, no
vLLM. Built from a wheel of this repo into a fresh virtualenv, so the boundary
cannot rot. The EigenTrack risk model is trained (torch) in the main
environment and served by the torch-free one."""

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
SIDECAR_DEPS = ["numpy", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "prometheus-client",
                "onnxruntime"]


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


def start_env_sidecar(env_dir: Path, *args: str):
    """`eigenwatch sidecar` of the sidecar-only environment: (process, gRPC target, metrics URL)."""
    from eigenwatch.monitor.cli.processes import READY

    proc = subprocess.Popen([str(env_dir / "bin" / "eigenwatch"), "sidecar", "--listen", "127.0.0.1:0",
                             "--metrics-port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=env_dir.parent)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        m = READY.search(line)
        if m:
            return (proc, *m.groups())
    proc.wait(10)
    pytest.fail("the sidecar exited before READY:\n" + "".join(lines[-30:]))


def test_sidecar_runs_without_torch_or_vllm(sidecar_env):
    py = str(sidecar_env / "bin" / "python")
    cwd = sidecar_env.parent  # not the repo root, whose eigenwatch/ folder would shadow the wheel
    for banned in ("torch", "vllm", "transformers"):
        probe = subprocess.run([py, "-c", f"import {banned}"], capture_output=True, cwd=cwd)
        assert probe.returncode != 0, f"{banned} is importable in the sidecar-only environment"
    check = subprocess.run(
        [py, "-c", "import sys, eigenwatch.monitor.cli.main, eigenwatch.monitor.sidecar.server, "
                   "eigenwatch.monitor.cli.serve, eigenwatch.monitor.cli.demo, eigenwatch.monitor.sidecar.risk, "
                   "eigenwatch.monitor.eigentrack, eigenwatch.hooks.frames; "
                   "eigenwatch.monitor.cli.main.build_parser(); "
                   "assert 'torch' not in sys.modules, 'torch imported'"],
        capture_output=True, text=True, cwd=cwd,
    )
    assert check.returncode == 0, check.stderr

    proc, target, metrics = start_env_sidecar(sidecar_env, "--calibration-frames", "2")
    try:
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


def test_torch_free_sidecar_scores_risk_like_the_main_environment(sidecar_env, tmp_path):
    from test_sidecar_risk import MODEL, QUIET, Pool, Request, batch, ingest, train_risk_model

    model = train_risk_model(tmp_path / "risk.onnx", seed=1)  # torch, here in the main environment
    pool = Pool(seed=6)
    reqs = [Request("a", [0, 1, 1, 0, 1], pool, seed=1), Request("b", [1, 0, 0], pool, seed=2)]
    proc, target, metrics = start_env_sidecar(sidecar_env, *QUIET, "--risk-model", str(model.path))
    try:
        batches = [batch([f for r in reqs if t < len(r.steps) for f in r.frames(t)]) for t in range(5)]
        ingest(target, batches + [batch([f for r in reqs for f in r.final()])])
        client = SidecarClient(target)
        for r in reqs:
            risk = client.report(r.rid).risk
            want = model.sequence(r.x())
            assert [s.token_count for s in risk.history] == [c for c, _ in r.steps]
            assert max(abs(s.risk - w) for s, w in zip(risk.history, want)) <= 1e-5
            assert risk.model_sha256 == model.sha256
        client.close()
        text = scrape(metrics)
        assert metric_value(text, "eigenwatch_risk_count", model=MODEL) == sum(len(r.steps) for r in reqs)
        assert metric_value(text, "eigenwatch_request_max_risk_count", model=MODEL) == len(reqs)
    finally:
        proc.terminate()
        proc.wait(10)
