"""`eigenwatch serve`: vLLM's OpenAI-compatible server with the tap, plus the
sidecar, in one command. Arguments after `--` go to vLLM unchanged."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

from eigenwatch.monitor.sidecar import config

from .processes import SidecarProcess, tap_env

_RENAME = {"listen": "sidecar-listen"}  # --listen would read as vLLM's address here


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="tiny | minilm | a local Hugging Face model directory")
    p.add_argument("--served-model-name", default=None,
                   help="model name clients use, also the `model` label of metrics and alerts "
                        "(default: tiny/minilm or the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="vLLM HTTP host (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="vLLM HTTP port (default %(default)s)")
    config.add_arguments(p, rename=_RENAME)
    p.add_argument("--layers", default=None, help="decoder layers to tap, e.g. 4,16,28 (default: three spread over depth)")
    p.add_argument("--window", type=int, default=None, help="rows per window W (default 32)")
    p.add_argument("--stride", type=int, default=None, help="a frame every N tokens (default 16)")
    p.add_argument("--proj-dim", type=int, default=None,
                   help="randomly project rows to this many dims first (default 0: off)")
    p.add_argument("--default", choices=["on", "off"], default=None,
                   help="monitor requests unless they opt out (on) or only when they opt in (off); "
                        "per request: vllm_xargs={'eigenwatch': 'on'|'off'}")


def check_calibration(args, env: dict) -> str | None:
    """The problem when --calibration was made with other tap settings than this
    server's (the sidecar would refuse every frame), None when they agree."""
    from eigenwatch.hooks.config import TapConfig, parse_layers
    from eigenwatch.monitor import calibration as calib

    if not args.calibration:
        return None
    try:
        cal = calib.load(args.calibration)
    except calib.CalibrationError as exc:
        return str(exc)
    if not cal.tap:
        return None
    have = {"window": int(env.get("EIGENWATCH_WINDOW") or TapConfig.window),
            "stride": int(env.get("EIGENWATCH_STRIDE") or TapConfig.stride),
            "proj_dim": int(env.get("EIGENWATCH_PROJ_DIM") or TapConfig.proj_dim)}
    diff = [f"--{k.replace('_', '-')} {v} (calibrated with {cal.tap[k]})" for k, v in have.items() if v != cal.tap[k]]
    layers = parse_layers(env.get("EIGENWATCH_LAYERS"))
    if layers is not None and sorted(layers) != sorted(cal.tap["layers"]):
        diff.append(f"--layers {','.join(map(str, layers))} (calibrated with {cal.tap['layers']})")
    if diff:
        return (f"--calibration: {args.calibration} was made with other tap settings than this server's: "
                f"{'; '.join(diff)}. Pass the calibration's settings, or recalibrate with these")
    return None


def cmd_serve(args) -> int:
    from pathlib import Path

    from eigenwatch.hooks.models import MODEL_ALIASES, resolve_model

    extra = [a for a in args.extra if a != "--"]
    try:
        path, runner = resolve_model(args.model)
    except (ValueError, RuntimeError) as exc:
        print(f"eigenwatch serve: {exc}", file=sys.stderr)
        return 2
    name = args.served_model_name or (args.model if args.model in MODEL_ALIASES else Path(path).name)
    cfg = config.from_args(args)
    env = tap_env("", layers=args.layers, window=args.window, stride=args.stride, default=args.default,
                  model_name=name, proj_dim=args.proj_dim)
    if cfg.token_file and "EIGENWATCH_TOKEN" not in env:
        env.setdefault("EIGENWATCH_TOKEN_FILE", cfg.token_file)  # the tap sends the sidecar's token
    if cfg.tls_cert and not env.get("EIGENWATCH_TLS_CA"):
        print("eigenwatch serve: --tls-cert: the tap in vLLM must trust the sidecar's certificate: set "
              "EIGENWATCH_TLS_CA to the CA that signed it (and EIGENWATCH_TLS_CERT/EIGENWATCH_TLS_KEY with "
              "--tls-client-ca, EIGENWATCH_TLS_SERVER_NAME if the certificate does not name 127.0.0.1)",
              file=sys.stderr)
        return 2
    problem = check_calibration(args, env)
    if problem is not None:
        print(f"eigenwatch serve: {problem}", file=sys.stderr)
        return 2
    try:
        sidecar = SidecarProcess(config.to_argv(cfg), echo=True).start()
    except RuntimeError as exc:
        print(f"eigenwatch serve: {exc}", file=sys.stderr)
        return 2
    env["EIGENWATCH_SIDECAR"] = sidecar.grpc
    if args.calibration and "EIGENWATCH_CALIBRATION" not in env:
        # the tap computes the combined score's hidden-state statistics against the same file
        env["EIGENWATCH_CALIBRATION"] = str(Path(args.calibration).resolve())
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
                sidecar = SidecarProcess(config.to_argv(cfg, listen=sidecar.grpc), echo=True).start()
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
