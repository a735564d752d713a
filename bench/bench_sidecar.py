"""How many frames per second one sidecar process ingests over a real gRPC
stream (validation, per-request state, spike detector, Prometheus histograms),
side by side with the same stream sent to a sidecar-shaped server that only
counts frames (the transport ceiling on this machine), and with the EigenTrack
risk model on (`--risk-model`: a GRU, hidden 32, trained here for a few epochs
on synthetic sequences; speed does not depend on its weights) against off.

Frames come as a tap sends them: every engine step, each request's frames of
all 3 layers at the same token count, so with the risk model on every request
takes one risk step per engine step.

Then a latency run (detectors and the risk model on, a calibration under which every
window alerts, --watchers WatchAlerts clients reading): sustained frames/s, p50/p99 from
a frame's batch leaving the sender to its alert reaching a watcher (an upper bound on
receipt -> alert; alerts come once per request, layer and severity), and the sidecar's
RSS slope over the run (MiB/min; flat means no growth per frame).

    .venv/bin/python bench/bench_sidecar.py [--frames 20000] [--batch 64] [--requests 256] [--watchers 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES, describe
from eigenwatch.monitor.cli.processes import SidecarProcess
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc


LAYERS = (0, 1, 2)


def spectra_pool(window: int = 32, dim: int = 256, n: int = 64):
    rng = np.random.default_rng(0)
    protos = []
    for i in range(n):  # a pool of distinct spectra, reused
        x = rng.standard_normal((window, dim))
        xc = x - x.mean(0)
        eigs = np.sort(np.linalg.eigvalsh(xc @ xc.T / dim))[::-1].clip(0)
        protos.append((eigs.astype(np.float32).tolist(), describe(eigs, window, dim).tolist()))
    return protos


def make_batches(n_frames: int, batch: int, n_requests: int, window: int = 32, dim: int = 256):
    protos = spectra_pool(window, dim)
    batches, frames = [], []
    for k in range(n_frames):
        eigs, desc = protos[k % len(protos)]
        step, rem = divmod(k, n_requests * len(LAYERS))  # engine step, then request-major, layer-minor
        r, layer = divmod(rem, len(LAYERS))
        frames.append(monitor_pb2.Frame(
            request_id=f"req-{r}", engine_request_id=f"req-{r}-0123abcd", model="bench", layer=LAYERS[layer],
            step=step, token_count=16 * (step + 1), window=window, dim=dim, eigenvalues=eigs, descriptors=desc))
        if len(frames) == batch:
            batches.append(monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, frames=frames))
            frames = []
    return batches


def make_risk_model(path: Path) -> str:
    """An ONNX risk model with `eigenwatch train`'s architecture (hidden 32) for the bench's layers."""
    from eigenwatch.monitor.offline.sequences import Sequences
    from eigenwatch.monitor.offline.train import export_onnx, train_model

    descs = np.array([d for _, d in spectra_pool()])  # [64, D]
    rng = np.random.default_rng(1)
    xs = [np.concatenate([descs[rng.integers(len(descs), size=8)] * (1 + i % 2) for _ in LAYERS], axis=1)
          for i in range(32)]  # 32 sequences of 8 steps; label 1 = scaled descriptors
    seqs = Sequences([str(i) for i in range(32)], np.arange(32) % 2, xs, "bench", LAYERS, DESCRIPTOR_NAMES)
    net, _ = train_model(seqs, hidden=32, epochs=3, progress=False)
    export_onnx(net, path, {"model": "bench", "layers": list(LAYERS), "descriptor_names": list(DESCRIPTOR_NAMES)})
    return str(path)


class CountingMonitor(monitor_pb2_grpc.MonitorServicer):
    async def Ingest(self, request_iterator, context):
        n = 0
        async for b in request_iterator:
            n += len(b.frames)
        return monitor_pb2.IngestSummary(frames_accepted=n)


def send(target: str, batches) -> float:
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        t0 = time.perf_counter()
        summary = monitor_pb2_grpc.MonitorStub(ch).Ingest(iter(batches), timeout=600)
        dt = time.perf_counter() - t0
    assert summary.frames_accepted == sum(len(b.frames) for b in batches), summary
    return dt


def counting_server_run(batches, repeats: int) -> list[float]:
    import threading

    ready = threading.Event()
    holder = {}

    def serve():
        async def main():
            server = grpc.aio.server()
            monitor_pb2_grpc.add_MonitorServicer_to_server(CountingMonitor(), server)
            holder["port"] = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            holder["stop"] = asyncio.Event()
            ready.set()
            await holder["stop"].wait()
            await server.stop(0)

        holder["loop"] = asyncio.new_event_loop()
        holder["loop"].run_until_complete(main())

    # The counting server runs in this process's thread; the sidecar in its own
    # process. Both are one Python process's worth of CPU on the receiving side.
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready.wait(10)
    times = [send(f"127.0.0.1:{holder['port']}", batches) for _ in range(repeats)]
    holder["loop"].call_soon_threadsafe(holder["stop"].set)
    th.join(5)
    return times


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def latency_run(base: list[str], model: str, args, tmp: Path) -> None:
    """Sustained ingest with every window alerting and `args.watchers` watchers reading."""
    import threading

    cal = tmp / "firing.json"
    cal.write_text(json.dumps({"format": "eigenwatch.calibration/v1", "models": {"bench": {
        str(l): {"sigma2": 1e-4, "spike_threshold": 0} for l in LAYERS}}}))
    argv = [a for a in base]
    argv[argv.index("--calibration") + 1] = str(cal)
    argv[argv.index("--max-requests") + 1] = "1000000"  # every round uses fresh request ids: all alert
    sc = SidecarProcess(argv + ["--risk-model", model, "--persist", "1"]).start()
    sent_at: dict[str, float] = {}
    lat: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(args.watchers + 1)
    channels = [grpc.insecure_channel(sc.grpc) for _ in range(args.watchers)]

    def watch(ch):
        call = monitor_pb2_grpc.MonitorStub(ch).WatchAlerts(monitor_pb2.WatchAlertsRequest(), timeout=3600)
        ready.wait()
        try:
            for a in call:
                t = time.perf_counter()
                s0 = sent_at.get(a.request_id)
                if s0 is not None:
                    with lock:
                        lat.append(t - s0)
        except grpc.RpcError:
            pass

    threads = [threading.Thread(target=watch, args=(ch,), daemon=True) for ch in channels]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.5)
    base_batches = make_batches(args.frames, args.batch, args.requests)
    rss: list[tuple[float, float]] = []
    n = 0
    t_end = time.perf_counter() + args.seconds

    def gen():
        nonlocal n
        rnd = 0
        while time.perf_counter() < t_end:
            for b in base_batches:
                out = monitor_pb2.FrameBatch()
                out.CopyFrom(b)
                now = time.perf_counter()
                for f in out.frames:  # fresh ids each round, so every round raises alerts
                    f.request_id = f"{f.request_id}.{rnd}"
                    f.engine_request_id = f"{f.engine_request_id}.{rnd}"
                    sent_at.setdefault(f.request_id, now)
                n += len(out.frames)
                if not rss or now - rss[-1][0] >= 1.0:
                    rss.append((now, rss_mb(sc.proc.pid)))
                yield out
            rnd += 1

    try:
        with grpc.insecure_channel(sc.grpc) as ch:
            t0 = time.perf_counter()
            monitor_pb2_grpc.MonitorStub(ch).Ingest(gen(), timeout=3600)
            dt = time.perf_counter() - t0
        time.sleep(1.0)
    finally:
        for ch in channels:
            ch.close()
        sc.stop()
    ts = np.array([t for t, _ in rss]) - rss[0][0]
    mb = np.array([m for _, m in rss])
    slope = float(np.polyfit(ts, mb, 1)[0]) * 60 if len(ts) > 2 else float("nan")
    per_watcher = len(lat) / max(1, args.watchers)
    p50, p99 = (np.percentile(lat, [50, 99]) * 1e3) if lat else (float("nan"), float("nan"))
    print(f"latency run: {args.seconds:.0f} s, {n} frames, {n / dt:.0f} frames/s with detectors, risk model and "
          f"{args.watchers} watchers; {per_watcher:.0f} alerts per watcher")
    print(f"  send -> alert at a watcher: p50 {p50:.1f} ms, p99 {p99:.1f} ms (goal: >= 100k frames/s, p99 <= 25 ms)")
    print(f"  sidecar RSS {mb[0]:.0f} -> {mb[-1]:.0f} MiB, slope {slope:+.1f} MiB/min over the run "
          "(fresh request ids: state grows until --max-requests / --memory-budget-mb evict)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--watchers", type=int, default=16, help="WatchAlerts clients in the latency run")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the latency run (0: skip it)")
    args = p.parse_args()
    batches = make_batches(args.frames, args.batch, args.requests)
    n = sum(len(b.frames) for b in batches)
    size = sum(b.ByteSize() for b in batches) / n

    tmp = Path(tempfile.mkdtemp())
    cal = tmp / "cal.json"
    cal.write_text(json.dumps({"format": "eigenwatch.calibration/v1", "models": {"bench": {
        str(l): {"sigma2": 0.9, "spike_threshold": 12} for l in LAYERS}}}))
    model = make_risk_model(tmp / "risk.onnx")
    base = ["--listen", "127.0.0.1:0", "--metrics-port", "0", "--calibration", str(cal),
            "--max-requests", str(max(args.requests, 1))]
    times: dict[str, list[float]] = {}
    risk_steps = 0
    # Risk off and on alternate, each on a fresh sidecar, so drift in machine load hits both alike.
    for _ in range(args.repeats):
        for name, extra in (("off", []), ("on", ["--risk-model", model])):
            sc = SidecarProcess(base + extra).start()
            try:
                times.setdefault(name, []).append(send(sc.grpc, batches))
                if name == "on":
                    from urllib.request import urlopen

                    text = urlopen(sc.metrics, timeout=5).read().decode()
                    risk_steps = sum(float(line.split()[-1]) for line in text.splitlines()
                                     if line.startswith("eigenwatch_risk_steps_total{"))
            finally:
                sc.stop()
    counting_times = counting_server_run(batches, args.repeats)

    print(f"{n} frames in batches of {args.batch}, {size:.0f} bytes per frame on the wire, {args.requests} requests, "
          f"{len(LAYERS)} layers; risk model on: {risk_steps:.0f} risk steps")
    print(f"  {'receiver':44s} {'median s':>9s} {'frames/s':>10s} {'vs ceiling':>10s}")
    ref = statistics.median(counting_times)
    for name, ts in (("counting server (transport ceiling)", counting_times),
                     ("eigenwatch sidecar, risk model off", times["off"]),
                     ("eigenwatch sidecar, risk model on", times["on"])):
        med = statistics.median(ts)
        print(f"  {name:44s} {med:9.3f} {n / med:10.0f} {med / ref:10.2f}")
    ratio = statistics.median(times["off"]) / statistics.median(times["on"])
    print(f"  ingest throughput with the risk model on / off: {ratio:.2f}")
    if args.seconds > 0:
        latency_run(base, model, args, tmp)


if __name__ == "__main__":
    main()
