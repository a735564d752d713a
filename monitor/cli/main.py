"""The `eigenwatch` command line: sidecar, serve, demo, calibrate, score,
report, extract, train, shield, signatures.

`sidecar` imports neither torch nor vLLM; the commands that need a model
import what they need inside the command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def cmd_sidecar(args) -> int:
    from eigenwatch.monitor.sidecar import config
    from eigenwatch.monitor.sidecar.server import run

    return run(config.from_args(args))


def _offline(func_path: str):
    """A command of monitor/offline/: OfflineError -> its message, exit 2."""
    def run(args) -> int:
        import importlib

        from eigenwatch.monitor.offline import OfflineError, log

        module, func = func_path.rsplit(".", 1)
        try:
            return getattr(importlib.import_module(module), func)(args)
        except OfflineError as exc:
            log(f"eigenwatch {args.command}: error: {exc}")
            return 2
    return run


def cmd_train(args) -> int:
    # torch (and onnx) load here, never for `eigenwatch sidecar`.
    try:
        from eigenwatch.monitor.offline.train import run
    except ImportError as exc:
        print(f"eigenwatch train: {exc}; install the training extra: pip install 'eigenwatch[train]'",
              file=sys.stderr)
        return 2
    return run(args)


def add_train_args(p) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    from eigenwatch.monitor.offline import calibrate, extract, report, score
    from eigenwatch.monitor.sidecar import config

    from . import demo, serve, shield, signatures

    parser = argparse.ArgumentParser(prog="eigenwatch", description="Spectral monitoring for vLLM servers.")
    parser.add_argument("--log-level", default=os.environ.get("EIGENWATCH_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, add_args, func):
        p = sub.add_parser(name, help=help)
        add_args(p)
        p.set_defaults(func=func)

    command("sidecar", "run the gRPC sidecar (no torch, no vLLM)", config.add_arguments, cmd_sidecar)
    command("serve", "vLLM's OpenAI server with the tap, plus the sidecar, in one command",
            serve.add_args, serve.cmd_serve)
    command("demo", "the embedded demo: tiny model + vLLM + tap + sidecar + live alerts",
            demo.add_args, demo.cmd_demo)
    command("calibrate", "run a model over reference texts (JSONL) and write a calibration file",
            calibrate.add_args, _offline("eigenwatch.monitor.offline.calibrate.calibrate"))
    command("score", "score texts (JSONL) against a calibration: one risk line per text",
            score.add_args, _offline("eigenwatch.monitor.offline.score.score"))
    command("report", "one self-contained HTML report (AUROC, ROC, histograms, a spectrum) from score files",
            report.add_report_args, report.report)
    command("extract", "descriptor sequences of texts (JSONL), labelled, for `eigenwatch train`",
            extract.add_args, _offline("eigenwatch.monitor.offline.extract.extract_sequences"))
    command("train", "fit the EigenTrack risk model (GRU) on `eigenwatch extract` files, export ONNX",
            add_train_args, cmd_train)
    command("signatures", "lexical signatures: index known-bad texts (--signatures), export the sparse head "
            "(--sparse-head), encode texts", signatures.add_args, _offline("eigenwatch.monitor.cli.signatures.run"))
    command("shield", "EigenShield: fit a shield file from reference embeddings or texts; print its attack table",
            shield.add_args, _offline("eigenwatch.monitor.cli.shield.run"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
