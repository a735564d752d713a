"""`eigenwatch` command line: sidecar, serve, demo, calibrate, score.

`sidecar` imports neither torch nor vLLM; `serve`, `demo`, `calibrate` and
`score` import what they need inside the command.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

DEFAULT_LISTEN = "127.0.0.1:50151"
DEFAULT_METRICS_PORT = 9400


def _nonneg_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= 0, got {text!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name}: expected an integer >= 0, got {v}")
        return v
    return parse


def _quantile(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--quantile: expected a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"--quantile: expected a number in (0, 1], got {v}")
    return v


def add_sidecar_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}listen", default=DEFAULT_LISTEN,
                   help="gRPC address host:port or unix:///path (default %(default)s; port 0 = any free port)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for /metrics (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help="port for Prometheus /metrics (default %(default)s; 0 = any free port; -1 = off)")
    p.add_argument("--calibration", help="calibration JSON to load (spectral_spike sigma2 and thresholds per layer; "
                                         "its 'risk' section sets the --risk-model thresholds)")
    p.add_argument("--calibration-frames", type=_nonneg_int("--calibration-frames"), default=64,
                   help="frames per layer to learn sigma2 from when no calibration file covers it (default %(default)s)")
    p.add_argument("--quantile", type=_quantile, default=0.99,
                   help="learned spike threshold = this quantile of calibration spike counts (default %(default)s)")
    p.add_argument("--spike-threshold", type=_nonneg_int("--spike-threshold"), default=None,
                   help="alert when more eigenvalues than this sit above the calibrated MP edge (overrides the learned one)")
    p.add_argument("--persist", type=_nonneg_int("--persist"), default=2,
                   help="alert only after this many consecutive windows over the threshold (default %(default)s)")
    p.add_argument("--save-calibration", help="write the learned calibration here as each layer finishes calibrating")
    p.add_argument("--max-requests", type=_nonneg_int("--max-requests"), default=10_000,
                   help="request states kept for reports (default %(default)s)")
    p.add_argument("--report-history", type=_nonneg_int("--report-history"), default=256,
                   help="frames per layer and risk steps a request's GetReport keeps, newest (default %(default)s; "
                        "at most ~24 KB per layer per request)")

    def probability(flag):
        def parse(text):
            try:
                v = float(text)
            except ValueError:
                v = None
            if v is None or not 0 < v < 1:
                raise argparse.ArgumentTypeError(f"{flag}: expected a probability in (0, 1), got {text!r}")
            return v
        return parse

    p.add_argument("--risk-model", default=None,
                   help="EigenTrack risk model (ONNX from `eigenwatch train`): live risk per request, "
                        "'eigentrack' alerts, eigenwatch_risk histograms")
    p.add_argument("--risk-high", type=probability("--risk-high"), default=None,
                   help="alert when the risk exceeds this (default: the calibration's risk.alert_high, else 0.9)")
    p.add_argument("--risk-low", type=probability("--risk-low"), default=None,
                   help="re-arm the alert once the risk falls below this (default: the calibration's "
                        "risk.clear_low, else 0.7)")
    p.add_argument("--risk-persist", type=_nonneg_int("--risk-persist"), default=1,
                   help="alert only after this many consecutive steps above --risk-high (default %(default)s)")


def sidecar_config(args, listen_attr: str = "listen"):
    from .server import SidecarConfig

    if args.calibration_frames < 1:
        raise SystemExit("--calibration-frames: expected an integer >= 1")
    if args.persist < 1:
        raise SystemExit("--persist: expected an integer >= 1")
    if args.max_requests < 1:
        raise SystemExit("--max-requests: expected an integer >= 1")
    if args.risk_persist < 1:
        raise SystemExit("--risk-persist: expected an integer >= 1")
    return SidecarConfig(
        listen=getattr(args, listen_attr),
        metrics_host=args.metrics_host,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        calibration_frames=args.calibration_frames,
        quantile=args.quantile,
        spike_threshold=args.spike_threshold,
        persist=args.persist,
        max_requests=args.max_requests,
        save_calibration=args.save_calibration,
        token=os.environ.get("EIGENWATCH_TOKEN") or None,
        report_history=args.report_history,
    )


def make_detector(args):
    from .detectors import CalibrationError, SpikeDetector, load_calibration

    calibration = None
    if args.calibration:
        try:
            calibration = load_calibration(args.calibration)
        except CalibrationError as exc:
            raise SystemExit(str(exc)) from None
    return SpikeDetector(calibration, args.calibration_frames, args.quantile, args.spike_threshold)


async def _run_sidecar(cfg, detector, risk=None) -> None:
    from .server import Sidecar

    sidecar = Sidecar(cfg, detector, risk=risk)
    await sidecar.start()
    host = cfg.listen.rsplit(":", 1)[0] if not cfg.listen.startswith("unix:") else cfg.listen
    grpc_addr = cfg.listen if cfg.listen.startswith("unix:") else f"{host}:{sidecar.port}"
    metrics = f"http://{cfg.metrics_host}:{sidecar.metrics_port}/metrics" if sidecar.metrics_port else "off"
    print(f"eigenwatch sidecar READY grpc={grpc_addr} metrics={metrics}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sidecar.stop(grace=1.0)
    print("eigenwatch sidecar stopped", flush=True)


def cmd_sidecar(args) -> int:
    from .live_risk import LiveRiskError, load_live_risk

    cfg = sidecar_config(args)
    detector = make_detector(args)
    try:
        risk = load_live_risk(args)  # the ONNX model and its thresholds, checked before serving
    except LiveRiskError as exc:
        print(f"eigenwatch sidecar: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run_sidecar(cfg, detector, risk))
    except OSError as exc:
        print(f"eigenwatch sidecar: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_calibrate(args) -> int:
    from .offline import calibrate, run

    return run(calibrate, args)


def cmd_score(args) -> int:
    from .offline import run, score

    return run(score, args)


def cmd_report(args) -> int:
    from .report import report

    return report(args)


def cmd_extract(args) -> int:
    from .offline import extract_sequences, run

    return run(extract_sequences, args)


def cmd_train(args) -> int:
    # torch (and onnx) load here, never for `eigenwatch sidecar`.
    try:
        from .train import run
    except ImportError as exc:
        print(f"eigenwatch train: {exc}; install the training extra: pip install 'eigenwatch[train]'",
              file=sys.stderr)
        return 2
    return run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eigenwatch", description="Spectral monitoring for vLLM servers.")
    parser.add_argument("--log-level", default=os.environ.get("EIGENWATCH_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sidecar", help="run the gRPC sidecar (no torch, no vLLM)")
    add_sidecar_args(p)
    p.set_defaults(func=cmd_sidecar)

    p = sub.add_parser("serve", help="vLLM's OpenAI server with the tap, plus the sidecar, in one command")
    from .serve import add_serve_args, cmd_serve

    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="the embedded demo: tiny model + vLLM + tap + sidecar + live alerts")
    from .demo import add_demo_args, cmd_demo

    add_demo_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("calibrate", help="run a model over reference texts (JSONL) and write a calibration file")
    from .offline import add_calibrate_args

    add_calibrate_args(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("score", help="score texts (JSONL) against a calibration: one risk line per text")
    from .offline import add_score_args

    add_score_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("report", help="one self-contained HTML report (AUROC, ROC, histograms, a spectrum) from score files")
    from .report import add_report_args

    add_report_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("extract", help="descriptor sequences of texts (JSONL), labelled, for `eigenwatch train`")
    from .offline import add_extract_args

    add_extract_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train", help="fit the EigenTrack risk model (GRU) on `eigenwatch extract` files, export ONNX")
    p.add_argument("--data", nargs="+", required=True, metavar="SEQ.jsonl",
                   help="sequence files from `eigenwatch extract`; both labels (0 and 1) must be present")
    p.add_argument("--out", required=True, help="ONNX model to write (read by the sidecar)")
    p.add_argument("--hidden", type=int, default=32, help="GRU hidden size (default %(default)s)")
    p.add_argument("--epochs", type=int, default=60,
                   help="most passes over the training split; early stopping usually ends sooner (default %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init and batches (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of each label held out for the validation AUROC, in [0, 1) (default %(default)s)")
    p.add_argument("--stop-fraction", type=float, default=0.2,
                   help="share of the training split set aside to pick the epoch (early stopping), in [0, 1); "
                        "0 runs every epoch (default %(default)s)")
    p.add_argument("--patience", type=int, default=8,
                   help="epochs without a better early-stopping loss before training ends (default %(default)s)")
    p.set_defaults(func=cmd_train)

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
