"""The sidecar's settings, declared once: each field of `SidecarConfig` that
carries flag metadata is a command-line flag, and the argparse options, the
config object and the argv of a child sidecar (`eigenwatch serve`, the demo)
are all built from those declarations.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, fields, replace

from eigenwatch.hooks.frames import DEFAULT_SIDECAR

TOKEN_ENV = "EIGENWATCH_TOKEN"


# ---- value parsers: argparse names the flag, the message says what is accepted ---------

def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return v
    return parse


def _nice(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not 0 <= v <= 19:
        raise argparse.ArgumentTypeError(f"expected an integer 0..19, got {text!r}")
    return v


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not -1 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535, 0 (any free port) or -1 (off), got {text!r}")
    return v


def _fraction(upper: str):
    """A number in (0, 1] (upper="]") or in (0, 1) (upper=")")."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not (0 < v <= 1 if upper == "]" else 0 < v < 1):
            what = "a number in (0, 1]" if upper == "]" else "a probability in (0, 1)"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_quantile, _probability = _fraction("]"), _fraction(")")


def _number_at_least(lo: float, strict: bool):
    """A finite number > lo (strict) or >= lo."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and (v > lo if strict else v >= lo)):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {lo:g}, got {text!r}")
        return v
    return parse


def _text(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def flag(default, help: str, parse=_text, metavar: str | None = None):
    """A SidecarConfig field that is also the command-line flag --<name-with-dashes>."""
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar})


@dataclass
class SidecarConfig:
    listen: str = flag(DEFAULT_SIDECAR, "gRPC address host:port or unix:///path (default %(default)s; "
                                        "port 0 = any free port)")
    metrics_host: str = flag("127.0.0.1", "address for /metrics (default %(default)s)")
    metrics_port: int = flag(9400, "port for Prometheus /metrics (default %(default)s; 0 = any free port; -1 = off)",
                             _port)
    calibration: str | None = flag(None, "calibration JSON to load (spectral_spike sigma2 and thresholds per "
                                         "layer; its 'risk' section sets the --risk-model thresholds)")
    calibration_frames: int = flag(64, "frames per layer to learn sigma2 from when no calibration file covers "
                                       "it (default %(default)s)", _int_at_least(1))
    quantile: float = flag(0.99, "learned spike threshold = this quantile of calibration spike counts "
                                 "(default %(default)s)", _quantile)
    spike_threshold: int | None = flag(None, "alert when more eigenvalues than this sit above the calibrated MP "
                                             "edge (overrides the learned one)", _int_at_least(0))
    persist: int = flag(2, "alert only after this many consecutive windows over the threshold "
                           "(default %(default)s)", _int_at_least(1))
    save_calibration: str | None = flag(None, "write the learned calibration here (atomically) as each layer "
                                              "finishes calibrating")
    max_requests: int = flag(10_000, "request states kept for reports (default %(default)s); --memory-budget-mb "
                                     "bounds their bytes too", _int_at_least(1))
    report_history: int = flag(256, "frames per layer and risk steps a request's GetReport keeps, newest "
                                    "(default %(default)s; ~24 KB per layer per request with this version's 23 descriptors, at most "
                                    "~67 KB with 64; charged against --memory-budget-mb)", _int_at_least(0))
    risk_model: str | None = flag(None, "EigenTrack risk model (ONNX from `eigenwatch train`): live risk per "
                                        "request, 'eigentrack' alerts, eigenwatch_risk histograms")
    risk_high: float | None = flag(None, "alert when the risk exceeds this (default: the calibration's "
                                         "risk.alert_high, else 0.9)", _probability)
    risk_low: float | None = flag(None, "re-arm the alert once the risk falls below this (default: the "
                                        "calibration's risk.clear_low, else 0.7)", _probability)
    risk_persist: int = flag(1, "alert only after this many consecutive steps above --risk-high "
                                "(default %(default)s)", _int_at_least(1))
    nice: int = flag(10, "lower this process's CPU priority by this much at start (0..19; default %(default)s), "
                         "so on shared cores the server it watches comes first: when the sidecar falls behind, "
                         "the taps drop frames (counted), the server never waits", _nice)
    shield: str | None = flag(None, "EigenShield file (.npz from `eigenwatch shield fit`) for the eigenwatch.v1.Shield "
                                    "service's Filter; reloaded when it changes (replace it atomically: write a new "
                                    "file, rename it over the old one, as `eigenwatch shield fit --out` does)")
    shield_max_rows: int = flag(4096, "most rows one Filter call takes, an integer >= 1 (default %(default)s); "
                                      "a call also stays under gRPC's 16 MiB message limit: rows x dim x 4 bytes",
                                _int_at_least(1))
    shield_quantile: float = flag(0.99, "Filter rejects a row whose score is above this conformal quantile of the "
                                        "shield's calibration scores, a probability in (0, 1) (default %(default)s: "
                                        "about 1%% of clean rows rejected)", _probability)
    shield_threshold: float | None = flag(None, "reject rows scoring above this fixed value instead, a number > 0 "
                                                "(the score is 1 on average over the reference rows)",
                                          _number_at_least(0.0, strict=True))
    shield_reload_s: float = flag(1.0, "seconds between checks of --shield for a new file (inode, size, mtime), "
                                       "a number >= 0; 0 = never reload (default %(default)s)",
                                  _number_at_least(0.0, strict=False))
    signatures: str | None = flag(None, "signature index (.npz from `eigenwatch signatures add`): requests whose lexical "
                                        "signature (the tap's EIGENWATCH_SIGNATURE_LAYER) comes within its calibrated "
                                        "threshold of a known-bad one raise 'signature_match'", metavar="SIGS.npz")
    sparse_head: str | None = flag(None, "sparse head (.npz from `eigenwatch signatures head`) for the "
                                         "eigenwatch.v1.Sparse service's SparseEncode", metavar="HEAD.npz")
    blas_threads: int = flag(1, "threads numpy's BLAS may use in this process (Filter's projection, the Gram "
                                "spectra), an integer >= 0; 0 = BLAS's own default, all cores (default %(default)s: "
                                "on shared cores a multi-threaded BLAS stalls on descheduled threads; "
                                "bench/bench_filter.py measures it)", _int_at_least(0))
    # Bounds and fairness (README "Limits"): what one client may make the sidecar hold or do.
    max_models: int = flag(16, "distinct `model` label values the sidecar accepts, an integer >= 1 (default "
                               "%(default)s); frames, stats and snapshots of further models are refused and counted "
                               "in eigenwatch_refused_total{reason=\"models\"}", _int_at_least(1))
    max_layers: int = flag(1024, "distinct (model, layer) pairs the sidecar accepts, all models together, an "
                                 "integer >= 1 (default %(default)s; each pair is ~50 Prometheus series); further "
                                 "ones are refused (eigenwatch_refused_total{reason=\"layers\"})", _int_at_least(1))
    memory_budget_mb: int = flag(1024, "MiB of request state, calibration buffers and reports the sidecar may hold "
                                       "(estimated, eigenwatch_state_bytes), an integer >= 16 (default %(default)s); "
                                       "over it, the least recently updated requests are evicted",
                                 _int_at_least(16))
    calibration_requests: int = flag(8, "distinct requests a layer's learned calibration must come from, an "
                                        "integer >= 1 (default %(default)s; at most --calibration-frames): each "
                                        "request contributes at most calibration-frames / this many frames, and "
                                        "sigma2 is the median of the per-request medians", _int_at_least(1))
    max_streams: int = flag(64, "concurrent Ingest streams, an integer >= 1 (default %(default)s); one more is "
                                "refused with RESOURCE_EXHAUSTED", _int_at_least(1))
    max_watchers: int = flag(64, "concurrent WatchAlerts streams, an integer >= 1 (default %(default)s); one more "
                                 "is refused with RESOURCE_EXHAUSTED", _int_at_least(1))
    watcher_stall_s: float = flag(10.0, "a WatchAlerts client that takes no alert for this many seconds while "
                                        "alerts wait for it is disconnected (RESOURCE_EXHAUSTED), a number > 0 "
                                        "(default %(default)s); meanwhile its oldest alerts are dropped "
                                        "(eigenwatch_alerts_dropped_total)", _number_at_least(0.0, strict=True))
    # Auth and transport (monitor/sidecar/tls.py checks them at start).
    tls_cert: str | None = flag(None, "serve TLS with this certificate chain (PEM); with --tls-key. The files are "
                                      "read again when they change (certificate rotation)", metavar="FILE")
    tls_key: str | None = flag(None, "the private key (PEM, unencrypted) of --tls-cert", metavar="FILE")
    tls_client_ca: str | None = flag(None, "mTLS: require client certificates signed by this CA (PEM); "
                                           "needs --tls-cert/--tls-key", metavar="FILE")
    token_file: str | None = flag(None, "require `authorization: Bearer <token>` on the Monitor and Shield services, "
                                        "the token read from this file (one trailing newline is stripped; any other "
                                        "whitespace is an error). Or set EIGENWATCH_TOKEN (not both)", metavar="FILE")
    allow_insecure_listen: bool = flag(False, "serve a non-loopback --listen address without a token or client "
                                              "certificates (refused otherwise)", parse=bool)
    # Not flags: from the environment, or fixed.
    # The token (EIGENWATCH_TOKEN), never in the repr: configs get logged.
    token: str | None = field(default=None, repr=False)
    idle_timeout_s: float = 900.0  # a request whose tap went silent this long is closed

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_port >= 0


def _flags():
    return [f for f in fields(SidecarConfig) if "help" in f.metadata]


def option(name: str, rename: dict[str, str] | None = None) -> str:
    return "--" + (rename or {}).get(name, name.replace("_", "-"))


def add_arguments(parser: argparse.ArgumentParser, rename: dict[str, str] | None = None,
                  defaults: dict | None = None) -> None:
    """Every sidecar flag on `parser`. rename: field -> flag name (serve's
    `--sidecar-listen`); defaults: other defaults for this command (the demo's)."""
    for f in _flags():
        opt = option(f.name, rename)
        default = (defaults or {}).get(f.name, f.default)
        if f.metadata["parse"] is bool:  # a switch
            parser.add_argument(opt, dest=f.name, default=default, help=f.metadata["help"], action="store_true")
            continue
        parser.add_argument(opt, dest=f.name, default=default, help=f.metadata["help"],
                            metavar=f.metadata["metavar"], type=f.metadata["parse"])


def from_args(args: argparse.Namespace, **overrides) -> SidecarConfig:
    values = {f.name: getattr(args, f.name) for f in _flags() if hasattr(args, f.name)}
    values["token"] = os.environ.get(TOKEN_ENV)  # "" too: tls.load refuses it rather than disable auth
    values.update(overrides)
    return SidecarConfig(**values)


def to_argv(cfg: SidecarConfig, **changes) -> list[str]:
    """`eigenwatch sidecar` arguments that give a child process this config
    (the token travels in its environment, never on a command line)."""
    cfg = replace(cfg, **changes) if changes else cfg
    argv = []
    for f in _flags():
        value = getattr(cfg, f.name)
        if value is None or (value == f.default and f.name != "listen"):
            continue
        if value is True:  # a switch
            argv.append(option(f.name))
            continue
        argv += [option(f.name), repr(value) if isinstance(value, float) else str(value)]
    return argv
