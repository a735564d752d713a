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
from pathlib import Path

from eigenwatch.monitor import calibration as calib
from eigenwatch.monitor.combined import Combined
from eigenwatch.monitor.mahalanobis import TokenMahalanobis
from eigenwatch.monitor.spectral_spike import SpectralSpike

from . import OfflineError, log
from .calibrate import ALL_DETECTORS
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


def score(args) -> int:
    try:
        cal = calib.load(args.calibration)
        off = cal.require_offline()
    except calib.CalibrationError as exc:
        raise OfflineError(str(exc)) from None
    stats = InputStats()
    items = read_jsonl(args.texts, stats)
    info = model_info(args.model)
    check_fingerprint(cal, info)
    try:
        detectors = {name: ALL_DETECTORS[name].from_state(st) for name, st in off["detectors"].items()}
        combined = Combined.from_state(off["combined"])
        far = float(off["alert_far"])
        tap = Tap(tuple(off["layers"]), int(off["window"]), int(off["stride"]), int(off.get("proj_dim", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise OfflineError(f"--calibration: {args.calibration}: damaged 'offline' section ({exc!r})") from None
    max_length = args.max_length if args.max_length is not None else off.get("max_length")
    engine = open_engine(args.engine, info, tap)
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
            raw = {name: d.score(feats) for name, d in detectors.items()}
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
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate texts to this many tokens (default: as calibrated)")
