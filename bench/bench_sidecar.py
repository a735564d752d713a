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
window alerts, --watchers WatchAlerts clients reading in a separate process): frames sent
at a sustained rate the sidecar keeps up with (--rate, default 10,000 frames/s; the run
says when the sender could not keep the schedule), so the latency is the path's, not a
backlog's. Requests come and go as under continuous batching (about requests/steps of
them start, and alert, at every engine step; --burst: all at once, every round); p50/p99 from a
frame's batch leaving the sender to its alert reaching a watcher (an upper bound on
receipt -> alert; alerts come once per request, layer and severity; the send time travels
in the request id), and the sidecar's RSS slope (MiB/min). --soak-s 600 adds the
10-minute soak at the same rate: fresh request ids all along, state bounded by
--soak-requests, RSS slope over the run and over its second half (flat: no growth).

Message size: the tap sends one message per engine step (hooks/export.py), and steps that
queued while the last message went out travel merged in one message, up to 1,024 frames. The
default, 64 frames, is one engine step of 256 requests at the tap's stride of 16 tokens (3
layers x 256 / 16 = 48 frames): a tap whose sidecar keeps up. `--batch 1024` is what the same
tap sends once its sidecar falls behind, so a saturated sidecar's sustained rate is the
1,024-frame row; the 64-frame row is the rate without that merging.

    .venv/bin/python bench/bench_sidecar.py [--frames 20000] [--batch 64] [--requests 256] [--watchers 16]
        [--seconds 20] [--rate FRAMES_PER_S] [--soak-s 600]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from eigenwatch.hooks import frames as wire
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


def n_frames(b: monitor_pb2.FrameBatch) -> int:
    return len(b.frames) + sum(len(c.layer) for c in b.columns)


def as_columns(b: monitor_pb2.FrameBatch) -> monitor_pb2.FrameBatch:
    """The same frames column by column (FrameColumns), as the tap sends them."""

    def values(w, group):
        return {"eigenvalues": np.array([list(f.eigenvalues) for f in group], dtype="<f4").tobytes(),
                "descriptors": np.array([list(f.descriptors) for f in group], dtype="<f8").tobytes()}

    blocks = wire.column_blocks(b.frames[0].model, b.frames, [f.window for f in b.frames], values)
    return monitor_pb2.FrameBatch(descriptor_names=b.descriptor_names, columns=blocks)


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
            n += n_frames(b)
        return monitor_pb2.IngestSummary(frames_accepted=n)


def send(target: str, batches) -> float:
    with grpc.insecure_channel(target) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        t0 = time.perf_counter()
        summary = monitor_pb2_grpc.MonitorStub(ch).Ingest(iter(batches), timeout=600)
        dt = time.perf_counter() - t0
    assert summary.frames_accepted == sum(n_frames(b) for b in batches), summary
    return dt


def counting_server_run(batches, repeats: int, listen: str = "127.0.0.1:0") -> list[float]:
    import threading

    ready = threading.Event()
    holder = {}

    def serve():
        async def main():
            server = grpc.aio.server()
            monitor_pb2_grpc.add_MonitorServicer_to_server(CountingMonitor(), server)
            port = server.add_insecure_port(listen)
            holder["target"] = listen if listen.startswith("unix:") else f"127.0.0.1:{port}"
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
    times = [send(holder["target"], batches) for _ in range(repeats)]
    holder["loop"].call_soon_threadsafe(holder["stop"].set)
    th.join(5)
    return times


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _watchers(target: str, n: int, ready, stop, out, batched: bool = False) -> None:
    """A separate process (as real watchers are other programs): `n` WatchAlerts streams on one
    grpc.aio event loop, each spike alert's latency from the send time the bench wrote into
    its request id (threads with the sync client would add the GIL's switch interval)."""

    async def main():
        lat: list[tuple[float, float]] = []  # (send -> receipt, send -> raised in the sidecar)
        channels = [grpc.aio.insecure_channel(target) for _ in range(n)]
        rpc = "WatchAlertBatches" if batched else "WatchAlerts"
        calls = [getattr(monitor_pb2_grpc.MonitorStub(ch), rpc)(monitor_pb2.WatchAlertsRequest()) for ch in channels]

        async def watch(call):
            try:
                async for msg in call:
                    t = time.time()  # the wall clock: the sender's and the sidecar's (Alert.time) too
                    for a in (msg.alerts if batched else (msg,)):
                        _, _, sent = a.request_id.rpartition("@")
                        # spike alerts fire on a request's first frames (persist 1, threshold 0), whose send
                        # time the id carries; risk alerts come steps later and are delivered, not timed
                        if sent and a.detector == "spectral_spike":
                            s0 = int(sent) * 1e-6
                            lat.append((t - s0, a.time - s0))
            except (grpc.RpcError, asyncio.CancelledError):
                pass

        tasks = [asyncio.ensure_future(watch(c)) for c in calls]
        gc.collect()
        gc.freeze()  # a full collection pass over the imports would be timed as delivery latency
        await asyncio.sleep(0.5)  # the streams are open on the sidecar before the first frame
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the last alerts arrive
        for c in calls:
            c.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        return lat

    out.put(asyncio.run(main()))


def paced_run(base: list[str], model: str, args, tmp: Path, seconds: float, rate: float, max_requests: int,
              label: str) -> dict:
    """Ingest paced at `rate` frames/s (a load the sidecar keeps up with, so latency is not
    backlog) with every window alerting, `args.watchers` watchers reading in another process:
    p50/p99 from a batch leaving the sender to its alerts reaching a watcher, and the sidecar's
    RSS slope (fresh request ids every round, --max-requests `max_requests` bounds the state)."""
    import multiprocessing as mp

    cal = tmp / "firing.json"
    cal.write_text(json.dumps({"format": "eigenwatch.calibration/v1", "models": {"bench": {
        str(l): {"sigma2": 1e-4, "spike_threshold": 0} for l in LAYERS}}}))
    argv = [a for a in base]
    argv[argv.index("--calibration") + 1] = str(cal)
    argv[argv.index("--max-requests") + 1] = str(max_requests)
    sc = SidecarProcess(argv + ["--risk-model", model, "--persist", "1"]).start()
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_watchers, args=(sc.grpc, args.watchers, ready, stop, out, args.batched), daemon=True)
    proc.start()
    if not ready.wait(60):
        raise RuntimeError("the watcher process did not start")
    base_batches = make_batches(args.frames, args.batch, args.requests)
    # The sender holds torch's objects (make_risk_model): a full collection pass over them takes
    # ~250 ms here and would be timed as the sidecar's latency. Out of the generations they go.
    gc.collect()
    gc.freeze()
    rss: list[tuple[float, float]] = []
    n = 0
    lag = 0.0  # how far the sender fell behind its schedule (s): > 0 means the rate was not kept
    t_start = time.perf_counter()
    t_end = t_start + seconds

    steps = max(f.step for b in base_batches for f in b.frames) + 1  # engine steps in base_batches
    # Continuous batching: request slot r's request ends and a fresh one (new id, token counts from
    # the start) takes its place every `steps` steps, slot r offset by r·steps/requests, so about
    # requests/steps requests start, and alert, at every step. --burst: all slots at once (lockstep).
    offset = [0 if args.burst else r * steps // args.requests for r in range(args.requests)]

    def gen():
        nonlocal n, lag
        rnd = 0
        sent: dict[tuple[int, int], str] = {}  # (slot, generation) -> request id carrying its send time
        while True:
            for b in base_batches:
                due = t_start + n / rate
                now = time.perf_counter()
                if now >= t_end:
                    return
                if due > now:
                    time.sleep(due - now)
                    now = time.perf_counter()
                else:
                    lag = max(lag, now - due)
                out_b = monitor_pb2.FrameBatch()
                out_b.CopyFrom(b)
                wall = int(time.time() * 1e6)
                for f in out_b.frames:
                    r = int(f.request_id[4:])  # "req-{r}"
                    g, age = divmod(rnd * steps + f.step + offset[r], steps)
                    rid = sent.get((r, g))
                    if rid is None:  # a request's first frames: fresh id, the send time in it
                        rid = sent[(r, g)] = f"{f.request_id}.{g}@{wall}"
                        sent.pop((r, g - 2), None)
                    f.request_id, f.engine_request_id = rid, rid + "-0"
                    f.step, f.token_count = age, 16 * (age + 1)
                n += len(out_b.frames)
                if args.wire == "columns":
                    out_b = as_columns(out_b)
                if not rss or now - rss[-1][0] >= 1.0:
                    rss.append((now, rss_mb(sc.proc.pid)))
                yield out_b
            rnd += 1

    try:
        with grpc.insecure_channel(sc.grpc) as ch:
            t0 = time.perf_counter()
            c0 = (cpu_s(sc.proc.pid), cpu_s(proc.pid), time.process_time())
            summary = monitor_pb2_grpc.MonitorStub(ch).Ingest(gen(), timeout=seconds + 600)
            dt = time.perf_counter() - t0
            busy = [(c1 - c) / dt for c, c1 in zip(c0, (cpu_s(sc.proc.pid), cpu_s(proc.pid), time.process_time()))]
        stop.set()
        lat = out.get(timeout=120)
        proc.join(30)
    finally:
        stop.set()
        sc.stop()
    ts = np.array([t for t, _ in rss]) - rss[0][0]
    mb = np.array([m for _, m in rss])
    half = ts >= ts[-1] / 2
    slope = float(np.polyfit(ts, mb, 1)[0]) * 60 if len(ts) > 2 else float("nan")
    slope2 = float(np.polyfit(ts[half], mb[half], 1)[0]) * 60 if half.sum() > 2 else float("nan")
    lat = np.array(lat, dtype=np.float64).reshape(-1, 2)
    nan2 = np.array([float("nan")] * 2)
    p50, p99 = np.percentile(lat[:, 0], [50, 99]) * 1e3 if len(lat) else nan2
    r50, r99 = np.percentile(lat[:, 1], [50, 99]) * 1e3 if len(lat) else nan2
    per_watcher = len(lat) / max(1, args.watchers)
    print(f"{label}: {seconds:.0f} s paced at {rate:.0f} frames/s: {n} frames, {n / dt:.0f} frames/s sustained "
          f"(sender at most {lag * 1e3:.0f} ms behind schedule), {summary.frames_accepted} accepted, with detectors, "
          f"risk model and {args.watchers} watchers; {per_watcher:.0f} alerts per watcher")
    if lag > 0.1:
        print(f"  NOT sustained: the sender fell {lag:.1f} s behind {rate:.0f} frames/s, so the latency below "
              "includes a backlog; pass a lower --rate")
    print(f"  send -> spike alert at a watcher: p50 {p50:.1f} ms, p99 {p99:.1f} ms (goal: p99 <= 25 ms); "
          f"of which send -> raised in the sidecar: p50 {r50:.1f} ms, p99 {r99:.1f} ms")
    print(f"  CPU use (cores): sidecar {busy[0]:.2f}, watchers' process {busy[1]:.2f}, sender {busy[2]:.2f}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"  sidecar RSS {mb[0]:.0f} -> {mb.max():.0f} (max) -> {mb[-1]:.0f} MiB; slope {slope:+.2f} MiB/min over "
          f"the run, {slope2:+.2f} MiB/min over its second half (--max-requests {max_requests}, fresh ids: the "
          "store fills, then evicts)")
    return {"fps": n / dt, "p50": p50, "p99": p99, "raised_p99": r99, "slope": slope, "slope2": slope2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=64,
                   help="frames per message (default %(default)s: one engine step of 256 requests at stride 16; "
                        "1024: the tap's merged message when steps queue behind a saturated sidecar)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--watchers", type=int, default=16, help="WatchAlerts clients in the latency run")
    p.add_argument("--batched", action="store_true",
                   help="the watchers use WatchAlertBatches (several alerts per message) instead of WatchAlerts")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the latency run (0: skip it)")
    p.add_argument("--rate", type=float, default=10_000.0,
                   help="frames/s of the latency run and the soak (default %(default).0f: at 3 layers per 16 tokens, "
                        "~53k generated tokens/s; the run says whether the sender kept the schedule)")
    p.add_argument("--soak-s", type=float, default=0.0,
                   help="then a soak of this many seconds at the same rate (600: the 10-minute soak), printing "
                        "the sidecar's RSS slope in MiB/min")
    p.add_argument("--burst", action="store_true",
                   help="latency run and soak with every request starting (and alerting) at once, each round")
    p.add_argument("--nice", type=int, default=0, help="the sidecars' --nice (default %(default)s)")
    p.add_argument("--soak-requests", type=int, default=4096, help="--max-requests in the latency run and soak")
    p.add_argument("--transport", choices=("tcp", "unix"), default="tcp",
                   help="the sidecar listens on loopback TCP (default) or a Unix socket, as in a pod whose "
                        "containers share one (the Helm chart's sidecar.transport=unix)")
    p.add_argument("--wire", choices=("columns", "frames"), default="columns",
                   help="the latency run's and soak's wire form: FrameColumns (the tap's) or Frame messages")
    args = p.parse_args()
    if args.batch < 1:
        p.error(f"--batch: expected a positive number of frames per message, got {args.batch}")
    batches = {"frames": make_batches(args.frames, args.batch, args.requests)}
    batches["columns"] = [as_columns(b) for b in batches["frames"]]
    n = sum(n_frames(b) for b in batches["frames"])
    size = {k: sum(b.ByteSize() for b in v) / n for k, v in batches.items()}

    tmp = Path(tempfile.mkdtemp())
    cal = tmp / "cal.json"
    cal.write_text(json.dumps({"format": "eigenwatch.calibration/v1", "models": {"bench": {
        str(l): {"sigma2": 0.9, "spike_threshold": 12} for l in LAYERS}}}))
    model = make_risk_model(tmp / "risk.onnx")
    # --nice 0: the sidecar at the sender's priority. Its default (+10) yields to the inference
    # server it shares cores with (bench_overhead.py); here it would yield to whatever else runs.
    listen = "127.0.0.1:0" if args.transport == "tcp" else f"unix://{tmp}/sidecar.sock"
    base = ["--listen", listen, "--metrics-port", "0", "--calibration", str(cal),
            "--max-requests", str(max(args.requests, 1)), "--nice", str(args.nice)]
    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    risk_steps = 0
    # Both wire forms, risk off and on, alternate, each on a fresh sidecar, so drift in machine
    # load hits every cell alike.
    for _ in range(args.repeats):
        for form in ("frames", "columns"):
            for name, extra in (("off", []), ("on", ["--risk-model", model])):
                sc = SidecarProcess(base + extra).start()
                try:
                    c0 = cpu_s(sc.proc.pid)
                    times.setdefault((form, name), []).append(send(sc.grpc, batches[form]))
                    cpu.setdefault((form, name), []).append((cpu_s(sc.proc.pid) - c0) / n)
                    if name == "on":
                        from urllib.request import urlopen

                        text = urlopen(sc.metrics, timeout=5).read().decode()
                        risk_steps = sum(float(line.split()[-1]) for line in text.splitlines()
                                         if line.startswith("eigenwatch_risk_steps_total{"))
                finally:
                    sc.stop()
    counting = {form: counting_server_run(batches[form], args.repeats,
                                          "127.0.0.1:0" if args.transport == "tcp" else f"unix://{tmp}/{form}.sock")
                for form in batches}

    print(f"{n} frames in batches of {args.batch}, {args.requests} requests, {len(LAYERS)} layers, over "
          f"{'loopback TCP' if args.transport == 'tcp' else 'a Unix socket'}; bytes per frame "
          f"on the wire: {size['frames']:.0f} as Frame messages, {size['columns']:.0f} as FrameColumns; risk model "
          f"on: {risk_steps:.0f} risk steps; load average {os.getloadavg()[0]:.1f}")
    print(f"  {'receiver':48s} {'median s':>9s} {'frames/s':>10s} {'vs ceiling':>10s} {'CPU µs/frame':>13s}")
    for form, label in (("frames", "Frame messages"), ("columns", "FrameColumns")):
        ref = statistics.median(counting[form])
        rows = [(f"counting server, {label} (transport ceiling)", counting[form], None)]
        rows += [(f"eigenwatch sidecar, {label}, risk model {name}", times[(form, name)], cpu[(form, name)])
                 for name in ("off", "on")]
        for name, ts, c in rows:
            med = statistics.median(ts)
            us = f"{statistics.median(c) * 1e6:13.1f}" if c else ""
            print(f"  {name:48s} {med:9.3f} {n / med:10.0f} {med / ref:10.2f} {us}")
    for name in ("off", "on"):
        print(f"  FrameColumns / Frame messages, risk model {name}: "
              f"{statistics.median(times[('frames', name)]) / statistics.median(times[('columns', name)]):.2f}× the frames/s")
    for form in batches:
        ratio = statistics.median(times[(form, "off")]) / statistics.median(times[(form, "on")])
        print(f"  {form}: ingest throughput with the risk model on / off: {ratio:.2f}")
    rate = args.rate
    if args.seconds > 0:
        paced_run(base, model, args, tmp, args.seconds, rate, args.soak_requests, "latency run")
    if args.soak_s > 0:
        paced_run(base, model, args, tmp, args.soak_s, rate, args.soak_requests, "soak")


if __name__ == "__main__":
    main()
