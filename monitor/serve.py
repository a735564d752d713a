"""`eigenwatch serve`: vLLM's OpenAI-compatible server with the tap, plus the
sidecar, in one command. Arguments after `--` go to vLLM unchanged."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

from .procs import SidecarProcess, tap_env


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from .cli import add_sidecar_args

    p.add_argument("--model", required=True, help="tiny | minilm | a local Hugging Face model directory")
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: tiny/minilm or the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="vLLM HTTP host (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="vLLM HTTP port (default %(default)s)")
    add_sidecar_args(p, prefix="sidecar-")
    p.add_argument("--layers", default=None, help="decoder layers to tap, e.g. 4,16,28 (default: three spread over depth)")
    p.add_argument("--window", type=int, default=None, help="rows per window W (default 32)")
    p.add_argument("--stride", type=int, default=None, help="a frame every N tokens (default 16)")
    p.add_argument("--default", choices=["on", "off"], default=None,
                   help="monitor requests unless they opt out (on) or only when they opt in (off); "
                        "per request: vllm_xargs={'eigenwatch': 'on'|'off'}")


def sidecar_argv(args, listen: str) -> list[str]:
    out = ["--listen", listen, "--metrics-host", args.metrics_host, "--metrics-port", str(args.metrics_port),
           "--calibration-frames", str(args.calibration_frames), "--quantile", str(args.quantile),
           "--max-requests", str(args.max_requests), "--persist", str(args.persist)]
    if args.calibration:
        out += ["--calibration", args.calibration]
    if args.spike_threshold is not None:
        out += ["--spike-threshold", str(args.spike_threshold)]
    if args.save_calibration:
        out += ["--save-calibration", args.save_calibration]
    from .live_risk import risk_argv

    return out + risk_argv(args)


def cmd_serve(args) -> int:
    from pathlib import Path

    from eigenwatch.hooks.models import resolve_model

    extra = [a for a in args.extra if a != "--"]
    try:
        path, runner = resolve_model(args.model)
    except (ValueError, RuntimeError) as exc:
        print(f"eigenwatch serve: {exc}", file=sys.stderr)
        return 2
    name = args.served_model_name or (args.model if args.model in ("tiny", "minilm") else Path(path).name)

    try:
        sidecar = SidecarProcess(sidecar_argv(args, args.sidecar_listen), echo=True).start()
    except RuntimeError as exc:
        print(f"eigenwatch serve: {exc}", file=sys.stderr)
        return 2
    env = tap_env(sidecar.grpc, layers=args.layers, window=args.window, stride=args.stride,
                  default=args.default, model_name=name)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
           "--served-model-name", name, "--host", args.host, "--port", str(args.port)]
    if runner == "pooling":
        cmd += ["--runner", "pooling"]
    cmd += extra
    print(f"eigenwatch serve: vLLM on http://{args.host}:{args.port}/v1 (model {name!r}), "
          f"sidecar gRPC {sidecar.grpc}, metrics {sidecar.metrics}", flush=True)
    vllm = subprocess.Popen(cmd, env=env)

    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    restarts = 0
    try:
        while not stopping:
            if vllm.poll() is not None:
                print(f"eigenwatch serve: vLLM exited with {vllm.returncode}", file=sys.stderr)
                return vllm.returncode or 1
            if not sidecar.alive():
                # The tap drops frames while the sidecar is away and reconnects on
                # its own; bring the sidecar back on the same address.
                restarts += 1
                print(f"eigenwatch serve: sidecar exited ({sidecar.proc.returncode}); restart #{restarts}",
                      file=sys.stderr, flush=True)
                time.sleep(min(5.0, 0.5 * restarts))
                sidecar = SidecarProcess(sidecar_argv(args, sidecar.grpc), echo=True).start()
            time.sleep(0.5)
        return 0
    finally:
        if vllm.poll() is None:
            vllm.terminate()
            try:
                vllm.wait(30)
            except subprocess.TimeoutExpired:
                vllm.kill()
        sidecar.stop()
