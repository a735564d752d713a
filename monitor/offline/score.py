"""`eigenwatch score`: score texts against a calibration file, one JSON line per
text: {"id", "score", "detectors": {...}, "alert", "p_value", "spectrum",
"layers"}. Higher = more anomalous; "score" is the combined −log10 conformal p.
"layers" holds, per tapped layer, what a live sidecar loaded with the same
file shows in GetReport for the same request: frames, max_spikes (against the
file's "models" section, the sidecar's calibration) and the final frame's
descriptors (last_descriptors, in DESCRIPTOR_NAMES order).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from eigenwatch.monitor import calibration as calib
from eigenwatch.monitor.combined import Combined
from eigenwatch.monitor.mahalanobis import TokenMahalanobis
from eigenwatch.monitor.spectral_spike import SpectralSpike

from . import OfflineError, check_out, log, positive_int
from .calibrate import ALL_DETECTORS, ROW_FITTED
from .engines import ENGINES, ModelInfo, Tap, fingerprint, model_info, open_engine
from .features import extract
from .texts import InputStats, read_jsonl


def check_fingerprint(cal: calib.Calibration, info: ModelInfo) -> None:
    want = cal.fingerprint
    have = fingerprint(info)
    diff = [k for k in have if want.get(k) != have[k]]
    if diff:
        def short(v):
            return v[:12] + "…" if isinstance(v, str) and len(v) > 16 else v

        detail = "; ".join(f"{k}: calibration {short(want.get(k))!r} vs model {short(have[k])!r}" for k in diff)
        raise OfflineError(
            f"--calibration: {cal.path} was made for model {want.get('name', '?')!r} "
            f"({want.get('architecture', '?')}), not for --model {info.key!r} "
            f"({have['architecture']}): {detail}. Recalibrate with `eigenwatch calibrate` on this model.")


def _int_field(off: dict, key: str, where: str, lo: int) -> int:
    v = off.get(key, 0 if key == "proj_dim" else None)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise OfflineError(f"{where}.{key}: expected an integer >= {lo}, got {v!r}; recalibrate with "
                           "`eigenwatch calibrate`")
    return v


def offline_settings(off: dict, path: str):
    """(detectors, combined, alert_far, tap) of a calibration's 'offline' section;
    OfflineError naming the field (offline.window, offline.detectors.X, …) when one is
    missing or of the wrong type."""
    where = f"--calibration: {path}: offline"
    for key in ("detectors", "combined", "alert_far", "layers", "window", "stride"):
        if key not in off:
            raise OfflineError(f"{where}.{key} is missing; recalibrate with `eigenwatch calibrate`")
    layers = off["layers"]
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
        raise OfflineError(f"{where}.layers: expected a list of layer numbers, got {layers!r}")
    tap = Tap(tuple(layers), _int_field(off, "window", where, 2), _int_field(off, "stride", where, 1),
              _int_field(off, "proj_dim", where, 0), source=f"{where}.layers")
    far = off["alert_far"]
    if isinstance(far, bool) or not isinstance(far, (int, float)) or not 0 < far < 1:
        raise OfflineError(f"{where}.alert_far: expected a rate in (0, 1), got {far!r}")
    if not isinstance(off["detectors"], dict) or not off["detectors"]:
        raise OfflineError(f"{where}.detectors: expected an object of detector states, got {off['detectors']!r}")
    detectors = {}
    for name, st in off["detectors"].items():
        if name not in ALL_DETECTORS:
            raise OfflineError(f"{where}.detectors.{name}: unknown detector (known: {', '.join(ALL_DETECTORS)})")
        try:
            detectors[name] = ALL_DETECTORS[name].from_state(st)
        except KeyError as exc:
            raise OfflineError(f"{where}.detectors.{name}: {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise OfflineError(f"{where}.detectors.{name}: damaged ({exc})") from None
    try:
        combined = Combined.from_state(off["combined"])
    except KeyError as exc:
        raise OfflineError(f"{where}.combined: {exc.args[0]!r} is missing") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise OfflineError(f"{where}.combined: damaged ({exc})") from None
    return detectors, combined, float(far), tap


def score(args) -> int:
    check_out(args.out, example="scores.jsonl")  # before the run, not after it
    try:
        cal = calib.load(args.calibration)
        off = cal.require_offline()
    except calib.CalibrationError as exc:
        raise OfflineError(str(exc)) from None
    detectors, combined, far, tap = offline_settings(off, args.calibration)
    stats = InputStats()
    items = read_jsonl(args.texts, stats)
    info = model_info(args.model)
    check_fingerprint(cal, info)
    max_length = args.max_length if args.max_length is not None else off.get("max_length")
    engine = open_engine(args.engine, info, tap, args.batch_size)
    t0 = time.perf_counter()
    try:
        ids, feats = extract(engine, info, items, max_length, stats, "score", detectors.get(TokenMahalanobis.name))
    finally:
        engine.close()
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fh = out.open("w")
    except OSError as exc:
        raise OfflineError(f"--out: cannot write {args.out!r}: {exc.strerror or exc}") from None
    alerts = 0
    spike = detectors.get("spectral_spike")
    live = SpectralSpike()  # the sidecar's rule with the sidecar's calibration (the "models" section)
    live.layers = {layer: c for (model, layer), c in cal.spike.items() if model == info.key}
    with fh:
        if feats:
            # Detectors that read per-token rows (layer_transition) need an engine that hands them
            # over (hf); under --engine vllm they are left out, never voters of the combined score.
            rowless = [n for n in detectors if n in ROW_FITTED and any("token_rows" not in f for f in feats)]
            if set(rowless) & set(combined.names):  # a hand-made file: never p = 1 for a voter in silence
                raise OfflineError(f"--calibration: its combined score uses {', '.join(set(rowless) & set(combined.names))}, "
                                   f"which reads per-token rows only --engine hf hands over; score with --engine hf")
            for name in rowless:
                log(f"eigenwatch score: {name} not scored: it reads per-token rows, which only --engine hf "
                    "hands over (the combined score does not use it)")
            try:
                raw = {name: d.score(feats) for name, d in detectors.items() if name not in rowless}
            except ValueError as exc:
                raise OfflineError(f"--calibration: {exc}") from None
            p = combined.p_values(raw)
            for i, rid in enumerate(ids):
                alert = bool(p[i] < far)
                alerts += alert
                line = {
                    "id": rid,
                    "score": float(-math.log10(p[i])),
                    "detectors": {name: float(v[i]) for name, v in raw.items()},
                    "alert": alert,
                    "p_value": float(p[i]),
                }
                if spike is not None:
                    line["spectrum"] = spike.top_window(feats[i])
                spikes = live.layer_spikes(feats[i])
                line["layers"] = {
                    str(l): {"frames": feats[i]["frames"][l], "max_spikes": max(spikes.get(l) or [0]),
                             "last_descriptors": feats[i]["last_desc"][l].tolist()}
                    for l in sorted(feats[i]["last_desc"])}
                fh.write(json.dumps(line) + "\n")
    took = time.perf_counter() - t0
    log(f"eigenwatch score: {len(feats)} text(s) in {took:.2f} s, {len(feats) / max(took, 1e-9):.1f} texts/s "
        "(forward, tap, detectors and writing; the model load before is not counted)")
    log(stats.summary("scored", len(feats)))
    log(f"eigenwatch score: wrote {out}: {len(feats)} line(s), {alerts} alert(s) at false-alarm rate {far}")
    return 0


def add_args(p) -> None:
    p.add_argument("--model", required=True, help="model directory, or 'tiny' / 'minilm'")
    p.add_argument("--calibration", required=True, help="CALIB.json written by `eigenwatch calibrate`")
    p.add_argument("--texts", required=True, help="texts to score: JSONL, one {\"id\", \"text\"} per line")
    p.add_argument("--out", required=True, help="SCORES.jsonl to write")
    p.add_argument("--engine", default="hf", choices=ENGINES,
                   help="hf: transformers (default); vllm: the vLLM engine with the same tap")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="truncate texts to this many tokens (default: as calibrated)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="texts per forward with --engine hf (default 32, padded to the longest of the batch, "
                        "texts sorted by length first); 1 runs one text per forward")
