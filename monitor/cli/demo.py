"""`eigenwatch demo`: the whole path on the embedded default, end to end.

Builds (once, cached) a tiny random-weight Llama, starts the sidecar and vLLM
with the tap, calibrates the spike detector on ordinary text, then sends a mix
of prompts while a WatchAlerts client prints alerts live, and ends with a
per-request table. The model's weights are random: its alerts demonstrate the
plumbing, not model quality.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

from .processes import SidecarProcess, tap_env


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", choices=["tiny", "minilm"],
                   help="tiny: random-weight Llama built locally; minilm: the real all-MiniLM-L6-v2 (default %(default)s)")
    p.add_argument("--listen", default="127.0.0.1:0", help="sidecar gRPC address (default: any free port)")
    p.add_argument("--metrics-port", type=int, default=0, help="sidecar /metrics port (default: any free port)")
    p.add_argument("--calibration-frames", type=int, default=256,
                   help="frames per layer the sidecar learns sigma2 from (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens generated per request (default %(default)s)")
    # 0.95, not the sidecar's 0.99: eight prompts are too few to show a 1% rule firing. Since the
    # sidecar learns its threshold from many requests with a per-request cap (robust to one client),
    # the random model's gibberish (12 spikes) no longer clears the 0.99 quantile; at 0.95 the
    # gibberish and symbol prompts alert and the ordinary ones do not.
    p.add_argument("--quantile", type=float, default=0.95,
                   help="the learned spike threshold is this quantile of the calibration windows' spike counts "
                        "(the sidecar's --quantile, whose own default is 0.99; default %(default)s)")


def _corpus_prompts(n: int, words: int, offset: int = 0) -> list[str]:
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics)).split()
    out = []
    for i in range(n):
        start = (offset + i * 997) % (len(text) - words)
        out.append(" ".join(text[start : start + words]))
    return out


def demo_prompts() -> list[tuple[str, str]]:
    """(kind, prompt): ordinary text, and inputs built to look unlike it."""
    import random

    rng = random.Random(7)
    normal = _corpus_prompts(4, 60, offset=50_000)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    gibberish = " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(70))
    repeated = "the the the the " * 20
    two_tokens = "yes no " * 40
    symbols = "".join(rng.choice("{}[]<>#$%^&*()!?;:|~`") for _ in range(180))
    return [
        ("ordinary", normal[0]),
        ("gibberish", gibberish),
        ("ordinary", normal[1]),
        ("repeated-token", repeated),
        ("alternating", two_tokens),
        ("symbols", symbols),
        ("ordinary", normal[2]),
        ("ordinary", normal[3]),
    ]


class AlertPrinter:
    def __init__(self, target: str):
        import grpc

        from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

        self.alerts = []
        self._channel = grpc.insecure_channel(target)
        stub = monitor_pb2_grpc.MonitorStub(self._channel)
        self._call = stub.WatchAlerts(monitor_pb2.WatchAlertsRequest(), metadata=_token_metadata())
        self._thread = threading.Thread(target=self._run, daemon=True, name="alert-printer")
        self._thread.start()

    def _run(self):
        import grpc

        from eigenwatch.monitor.sidecar.alerts import severity_name

        try:
            for a in self._call:
                self.alerts.append(a)
                print(f"  ALERT {severity_name(a.severity):8s} {a.detector} request={a.request_id} "
                      f"layer={a.layer} tokens={a.token_count}: {a.message}", flush=True)
        except grpc.RpcError:
            pass

    def close(self):
        self._call.cancel()
        self._channel.close()


def cmd_demo(args) -> int:
    import grpc

    from eigenwatch.hooks._vllm_engine import Engine, EngineError
    from eigenwatch.hooks.models import resolve_model
    from eigenwatch.monitor.sidecar.config import SidecarConfig, to_argv
    from eigenwatch.v1 import monitor_pb2_grpc

    print("eigenwatch demo")
    if args.model == "tiny":
        print("  model: a tiny Llama with RANDOM weights, built locally (cached). Its text is noise;")
        print("  its alerts show the plumbing (tap -> spectra -> sidecar -> alerts), not model quality.")
    path, runner = resolve_model(args.model)
    print(f"  weights: {path}")

    cfg = SidecarConfig(listen=args.listen, metrics_port=args.metrics_port, calibration_frames=args.calibration_frames,
                        quantile=args.quantile)
    try:
        sidecar = SidecarProcess(to_argv(cfg)).start()
    except RuntimeError as exc:
        print(f"eigenwatch demo: {exc}", file=sys.stderr)
        return 2
    print(f"  sidecar: gRPC {sidecar.grpc} (eigenwatch.v1.Monitor, health, reflection); Prometheus {sidecar.metrics}")
    # vLLM's INFO lines would bury the demo's own output; warnings still show.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TQDM_DISABLE", "1")
    tap = {k: v for k, v in tap_env(sidecar.grpc, model_name=args.model).items() if k.startswith("EIGENWATCH_")}

    engine = None
    printer = None
    try:
        try:
            # An encoder keeps its own context length (MiniLM: 256 positions).
            engine = Engine(path, runner, tap_env=tap, max_model_len=None if runner == "pooling" else 1024,
                            served_model_name=args.model)
        except EngineError as exc:
            print(f"eigenwatch demo: {exc}", file=sys.stderr)
            return 2
        pooling = runner == "pooling"
        printer = AlertPrinter(sidecar.grpc)
        # About 10 windows per prompt and layer at the default stride: enough
        # ordinary traffic to fill the calibration with some to spare.
        n_cal = max(4, args.calibration_frames // (4 if pooling else 8))
        calib = _corpus_prompts(n_cal, 60)
        print(f"\n[1/2] calibrating on {len(calib)} ordinary prompts (the sidecar learns sigma2 per layer)")
        if pooling:
            engine.embed(calib)
        else:
            engine.generate(calib, args.max_tokens)
        _wait_calibrated(sidecar.metrics, timeout=30)

        prompts = demo_prompts()
        print(f"\n[2/2] sending {len(prompts)} prompts; alerts appear as the sidecar raises them:")
        texts = [p for _, p in prompts]
        outs = engine.embed(texts) if pooling else engine.generate(texts, args.max_tokens)
        ids = [o.request_id for o in outs]
        gen = [len(o.token_ids) for o in outs]
        plen = [len(o.prompt_token_ids) for o in outs]

        stub = monitor_pb2_grpc.MonitorStub(grpc.insecure_channel(sidecar.grpc))
        reports = _wait_reports(stub, ids, timeout=30)
        time.sleep(0.5)
        print("\nper-request table (rows = hidden-state rows the tap attributed per layer):")
        header = f"  {'request':8s} {'kind':15s} {'prompt':>6s} {'gen':>4s} {'rows':>5s} {'frames':>6s} {'max spikes':>10s} {'alerts':>6s}"
        print(header)
        for rid, (kind, _), pl, g in zip(ids, prompts, plen, gen):
            rep = reports.get(rid)
            if rep is None:
                print(f"  {rid:8s} {kind:15s} {pl:6d} {g:4d}   (no report)")
                continue
            rows = max((l.token_count for l in rep.layers), default=0)
            frames = sum(l.frames for l in rep.layers)
            spikes = max((l.max_spikes for l in rep.layers), default=0)
            print(f"  {rid:8s} {kind:15s} {pl:6d} {g:4d} {rows:5d} {frames:6d} {spikes:10d} {len(rep.alerts):6d}")
        print(f"\n{len(printer.alerts)} alert(s) received over WatchAlerts.")
        _print_metrics(sidecar.metrics)
        print(f"\ngRPC: {sidecar.grpc}   metrics: {sidecar.metrics}")
        print("To watch your own server: eigenwatch serve --model /path/to/model  (see README)")
        return 0
    finally:
        if printer is not None:
            printer.close()
        if engine is not None:
            engine.close()
        sidecar.stop()


def _scrape(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _wait_calibrated(metrics_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "eigenwatch_calibration_sigma2{" in _scrape(metrics_url):
            return
        time.sleep(0.3)
    print("  (the sidecar has not finished calibrating yet; alerts start once it has)")


def _token_metadata():
    """The demo's sidecar is its own, on loopback, without TLS; it inherits
    EIGENWATCH_TOKEN(_FILE) from this environment, so its clients send that token."""
    from eigenwatch.hooks.config import ClientSecurity

    return ClientSecurity(token=ClientSecurity.from_env().token).metadata()


def _wait_reports(stub, ids, timeout: float) -> dict:
    import grpc

    from eigenwatch.v1 import monitor_pb2

    out = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(out) < len(ids):
        for rid in ids:
            if rid in out:
                continue
            try:
                rep = stub.GetReport(monitor_pb2.GetReportRequest(request_id=rid), timeout=5,
                                     metadata=_token_metadata())
            except grpc.RpcError:
                continue
            if rep.finished:
                out[rid] = rep
        time.sleep(0.2)
    return out


def _print_metrics(url: str) -> None:
    keep = ("eigenwatch_frames_ingested_total", "eigenwatch_alerts_total", "eigenwatch_tap_frames_dropped_total",
            "eigenwatch_active_requests", "eigenwatch_calibration_sigma2")
    lines = [l for l in _scrape(url).splitlines() if l.startswith(keep)]
    print(f"\nfrom {url}:")
    for line in lines[:16]:
        print("  " + line)
