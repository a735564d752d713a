"""`eigenwatch calibrate`: fit every detector on reference texts and write
CALIB.json (monitor/calibration.py), everything `score` and the sidecar need.

Calibration splits the (shuffled with a fixed seed) reference texts: the
detectors are fitted on the first part and their scores on the rest are the
conformal calibration scores (split conformal: in-sample scores of a
Mahalanobis fit are far too small when n is not ≫ d). Corrupted copies of the
texts (monitor/offline/texts.py) train the EigenTrack GRU and weight the
combined score's voters. The file's "models" section is the live sidecar's
spike calibration over all reference windows, and its "tap" section the tap
settings it was made with.

The "drift" section (the live drift detector, monitor/sidecar/drift.py), per
tapped layer: the reference direction is the exact top eigenvector of the fit
texts' second moment Σ XᵀX (the token sums the other detectors use; exact, so
the reference adds no sketch error of its own). The calibration texts' rows
then go, in order, through the live tap's own windows (hooks/sketches.py:
the same sketch, `--drift-every` tokens per window, one row in `--drift-sample`),
and each window's top direction gives one angle to the reference: the spread a
live window shows on in-distribution traffic, sampling noise and sketch error
together. Rule: alert_deg = min(90, margin × the largest of those m angles),
clear_deg = the largest angle (re-arm below what calibration itself showed);
an alert needs `--drift-persist` windows above alert_deg in a row. The largest
of m angles sits near their m/(m+1) quantile, so a false alarm needs `persist`
consecutive windows `margin`× beyond anything calibration saw. At least
MIN_DRIFT_WINDOWS windows are required (else no drift section, logged).
Only `--engine hf` has the rows here (vLLM keeps them inside its worker).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES
from eigenwatch.monitor import calibration as calib
from eigenwatch.monitor.combined import SUPERVISED, Combined, combined_voters, corruption_weights
from eigenwatch.monitor.eigentrack import EigenTrack, RiskModelError
from eigenwatch.kernels.hidden_stats import LLMCHECK_ROWS
from eigenwatch.monitor.llmcheck import RIDGE, LLMCheckHidden, middle_layer
from eigenwatch.monitor.mahalanobis import (DescriptorMahalanobis, HiddenMahalanobis, TokenMahalanobis,
                                            TokenMoments)
from eigenwatch.monitor.spectral_spike import SpectralSpike
from eigenwatch.monitor.token_probe import TokenProbe
from eigenwatch.monitor.tokenrows import FEATURE as TOKEN_ROWS
from eigenwatch.monitor.transition import LayerTransition

from . import OfflineError, log
from .engines import Tap, fingerprint, model_info, open_engine
from . import check_out
from .features import add_tap_args, extract, parse_layers
from .texts import InputStats, corrupt_all, corrupt_all_kinds, read_jsonl

# Detectors fitted on the fit texts' features alone.
FITTED = {c.name: c for c in (SpectralSpike, DescriptorMahalanobis, HiddenMahalanobis, LLMCheckHidden)}
# Fitted on the fit texts' per-token rows, which only the hf engine hands over (monitor/tokenrows.py);
# reported as their own rows, not voters of the combined score (the live tap does not compute them yet).
ROW_FITTED = {c.name: c for c in (LayerTransition,)}
# Every detector a calibration file may hold (EigenTrack is trained, TokenMahalanobis fitted from
# token sums during extraction, TokenProbe from the fit texts' token sums against their corrupted
# copies': none from the per-text features alone). TokenProbe scores from token sums, so it votes.
ALL_DETECTORS = dict(FITTED, **ROW_FITTED, **{EigenTrack.name: EigenTrack, TokenMahalanobis.name: TokenMahalanobis,
                                              TokenProbe.name: TokenProbe})
# Fewer corrupted calibration texts than this and the voters' AUROCs are too
# noisy to weight by (null s.d. of an AUROC ≈ 0.09 at 20 vs 20): equal weights.
MIN_TEXTS_FOR_WEIGHTS = 20
OFFLINE_VERSION = 1
MIN_DRIFT_WINDOWS = 3


def parse_far(text: str) -> list[float]:
    try:
        fars = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OfflineError(f"--far: expected comma-separated rates in (0, 1), got {text!r}") from None
    if not fars or not all(0 < f < 1 for f in fars):
        raise OfflineError(f"--far: expected comma-separated rates in (0, 1), got {text!r}")
    return fars


def parse_voters(text: str, fitted) -> list[str] | None:
    """--voters: None for 'auto' (combined_voters' rule), else the named detectors, each one
    `calibrate` fitted (a detector it could not fit here is named with the reason to look for)."""
    if text == "auto":
        return None
    names = [x.strip() for x in text.split(",") if x.strip()]
    can_vote = sorted(set(ALL_DETECTORS) - set(ROW_FITTED))
    unknown = [x for x in names if x not in can_vote]
    missing = [x for x in names if x in can_vote and x not in fitted]
    if not names or unknown:
        rows = [x for x in unknown if x in ROW_FITTED]
        raise OfflineError(f"--voters: expected 'auto' or comma-separated detectors among {', '.join(can_vote)}, "
                           f"got {text!r}" + (f" ({', '.join(rows)} reads per-token rows, which only --engine hf "
                                              "hands over and the live tap does not compute: it cannot vote)"
                                              if rows else ""))
    if missing:
        raise OfflineError(f"--voters: {', '.join(missing)} could not be fitted by this calibration (see the log "
                           f"above); fitted: {', '.join(sorted(fitted))}")
    return sorted(set(names))


def tap_settings(args) -> Tap:
    return Tap(parse_layers(args.layers), args.window, args.stride, args.proj_dim)


def calibrate(args) -> int:
    check_out(args.out, example="calibration.json")  # before the run, not after it
    tap = tap_settings(args)
    fars = parse_far(args.far)
    parse_voters(args.voters, ALL_DETECTORS)  # a misspelt name fails now, not after the extraction
    tap.check()
    if not 0 < args.calib_fraction < 1:
        raise OfflineError("--calib-fraction: expected a number in (0, 1)")
    for flag, v in (("--gru-hidden", args.gru_hidden), ("--gru-epochs", args.gru_epochs),
                    ("--drift-sample", args.drift_sample), ("--drift-persist", args.drift_persist)):
        if v < 1:
            raise OfflineError(f"{flag}: expected an integer >= 1, got {v}")
    if args.drift_every != 0 and not max(2, args.drift_sample) <= args.drift_every:
        raise OfflineError(f"--drift-every: expected 0 (off) or an integer >= max(2, --drift-sample) "
                           f"({args.drift_sample}), got {args.drift_every}")
    if not (math.isfinite(args.drift_margin) and args.drift_margin >= 1):
        raise OfflineError(f"--drift-margin: expected a number >= 1, got {args.drift_margin}")
    stats = InputStats()
    items = read_jsonl(args.texts, stats)

    def too_few(fit: int, cal: int):
        return OfflineError(f"--texts: calibration needs at least 4 usable texts (2 to fit, 2 to calibrate), "
                            f"got {fit + cal} ({fit} + {cal}); see the warnings above for skipped ones")

    if len(items) < 4:
        raise too_few(max(len(items) - 2, 0), min(len(items), 2))
    info = model_info(args.model)
    engine = open_engine(args.engine, info, tap)
    try:
        tapped = tuple(engine.layers)
        # Split before extracting: the token-level Gaussian is fitted from the fit
        # texts' token sums as they stream past, and only then can the calibration
        # texts be given their token-level distances.
        order = np.random.default_rng(args.seed).permutation(len(items))
        n_cal = min(len(items) - 2, max(2, int(round(len(items) * args.calib_fraction))))
        acc = TokenMoments()
        fit_ids, fit_feats = extract(engine, info, [items[i] for i in order[n_cal:]], args.max_length, stats,
                                     "calibrate: fit", acc)
        if len(fit_feats) < 2:
            raise too_few(len(fit_feats), 0)
        token_det = TokenMahalanobis.from_moments(acc)
        cal_items = [items[i] for i in order[:n_cal]]
        sketching = args.drift_every > 0 and hasattr(engine, "start_sketches")
        if sketching:
            engine.start_sketches(args.drift_every, args.drift_sample)
        _, cal_feats = extract(engine, info, cal_items, args.max_length, stats, "calibrate: calibration",
                               token_det)
        windows = engine.stop_sketches() if sketching else []
        if args.drift_every > 0 and not sketching:
            log(f"calibrate: no drift section: --engine {args.engine} keeps the rows inside its worker; "
                "calibrate with --engine hf for the live drift detector")
        n, n_cal = len(fit_feats) + len(cal_feats), len(cal_feats)
        if n_cal < 2:
            raise too_few(len(fit_feats), n_cal)
        feats = fit_feats + cal_feats

        # Corrupted copies: of each fit text, token_probe's second class (its token sums
        # accumulate as the copies stream past) and the GRU's positives (--risk-model auto);
        # of each calibration text, with another seed, for the combined score's weights. The
        # calibration texts themselves stay untouched for the p-values.
        text_of = dict(items)
        corrupted_fit = corrupt_all([text_of[r] for r in fit_ids], args.seed)
        corrupted_acc = TokenMoments()
        _, c_fit = extract(engine, info, [(f"{r}~corrupted", t) for r, t in zip(fit_ids, corrupted_fit)],
                           args.max_length, InputStats(), "calibrate: corrupted fit copies", corrupted_acc)
        corrupted_cal, kinds = corrupt_all_kinds([t for _, t in cal_items], args.seed + 1)
        kind_of = {f"{r}~corrupted-cal": k for (r, _), k in zip(cal_items, kinds)}
        c_cal_ids, c_cal = extract(engine, info, [(f"{r}~corrupted-cal", t) for (r, _), t in
                                                  zip(cal_items, corrupted_cal)],
                                   args.max_length, InputStats(), "calibrate: corrupted calibration copies", token_det)
        cal_kinds = [kind_of[r] for r in c_cal_ids]  # a copy too short to extract is skipped with its kind
    finally:
        engine.close()

    detectors = {name: cls().fit(fit_feats) for name, cls in FITTED.items()}
    if len(tapped) < 2:  # layer_transition maps one tapped layer to the next
        log(f"calibrate: no {', '.join(ROW_FITTED)}: it needs at least two tapped layers, got {list(tapped)}")
    elif all(TOKEN_ROWS in f for f in feats):
        detectors.update({name: cls().fit(fit_feats) for name, cls in ROW_FITTED.items()})
    else:
        log(f"calibrate: no {', '.join(ROW_FITTED)}: --engine {args.engine} hands over no per-token rows "
            "(calibrate with --engine hf for them)")
    detectors[token_det.name] = token_det
    if len(c_fit) >= 2:
        detectors[TokenProbe.name] = probe = TokenProbe().fit(acc.sums, corrupted_acc.sums, tapped)
        log(f"calibrate: {TokenProbe.name} at layer {probe.probe.layer}: linear discriminant of "
            f"{probe.n_rows[0]} reference and {probe.n_rows[1]} corrupted tokens")
    else:
        log(f"calibrate: no {TokenProbe.name}: fewer than 2 corrupted fit copies could be extracted")
    eigentrack, risk_info = risk_model(args, info.key, tapped, fit_feats, c_fit)
    if eigentrack is not None:
        detectors[eigentrack.name] = eigentrack
    cal_scores = {name: d.score(cal_feats) for name, d in detectors.items()}
    # The candidates (one per source of evidence), their AUROCs on the corrupted copies, then the
    # voters among them (the GRU stands down where the probe tells the copies apart better).
    candidates = parse_voters(args.voters, cal_scores) or combined_voters(k for k in cal_scores if k not in ROW_FITTED)
    weights, corruption_auroc, auroc_by_kind = None, {}, {}
    if len(c_cal) >= 2:
        weights, corruption_auroc, auroc_by_kind = corruption_weights(
            {k: cal_scores[k] for k in candidates}, {k: detectors[k].score(c_cal) for k in candidates},
            kinds=cal_kinds)
    voters = candidates if args.voters != "auto" else combined_voters(candidates, corruption_auroc or None)
    if weights is not None:
        weights = {k: weights[k] for k in voters}
    for k in sorted(set(candidates) - set(voters)):
        log(f"calibrate: {k} does not vote: {SUPERVISED[0]} tells the corrupted copies apart better "
            f"(AUROC {corruption_auroc[SUPERVISED[0]]:.3f} against {corruption_auroc[k]:.3f}); "
            f"--voters names the voters yourself")
    if len(c_cal) < MIN_TEXTS_FOR_WEIGHTS or len(cal_feats) < MIN_TEXTS_FOR_WEIGHTS:
        weights = None
        log(f"calibrate: {len(cal_feats)} calibration texts and {len(c_cal)} corrupted copies, fewer than "
            f"{MIN_TEXTS_FOR_WEIGHTS}: the combined score weights its detectors equally")
    combined = Combined().fit({k: cal_scores[k] for k in voters}, weights=weights)
    def why(k: str) -> str:  # the AUROCs behind a voter's weight
        if k not in corruption_auroc:
            return ")"
        kinds = auroc_by_kind.get(k) or {}
        best = max(kinds, key=kinds.get) if kinds else None
        return f", AUROC {corruption_auroc[k]:.3f} on corrupted copies" + (
            f", {kinds[best]:.3f} on its best kind, {best})" if best and kinds[best] > corruption_auroc[k] else ")")

    log("calibrate: combined score from " + ", ".join(f"{k} (weight {combined.weights[k]:.2f}{why(k)}" for k in voters)
        + f"; reported beside them: {', '.join(sorted(set(cal_scores) - set(voters))) or 'none'}")
    if min(fars) < 1.0 / (n_cal + 1):
        log(f"warning: --far {min(fars)} is below 1/(n+1) = {1 / (n_cal + 1):.4f} for {n_cal} calibration "
            "texts: that rate can never alert; use more reference texts")

    # The live sidecar's section: spectral_spike σ² and thresholds over *all* reference windows.
    spike_all = SpectralSpike().fit(feats)
    offline = {
        "version": OFFLINE_VERSION,
        "engine": args.engine,
        "layers": list(tapped),
        "window": tap.window,
        "stride": tap.stride,
        "proj_dim": tap.proj_dim,
        "max_length": args.max_length,
        "far": fars,
        "alert_far": fars[0],
        "score_thresholds": {str(f): -math.log10(f) for f in fars},
        "descriptor_names": list(DESCRIPTOR_NAMES),
        "n_reference": n,
        "n_fit": len(fit_feats),
        "n_calibration": n_cal,
        "split_seed": args.seed,
        "llmcheck": {"layer": middle_layer(tapped), "ridge": RIDGE, "rows": LLMCHECK_ROWS},
        "detectors": {name: d.state() for name, d in detectors.items()},
        "combined": combined.state(),
        # every detector's scores on the calibration texts (the combined keeps its voters'):
        # per-detector p-values and bench/bench_detect.py --bound read them
        "calibration_scores": {k: v.tolist() for k, v in sorted(cal_scores.items())},
        "corrupted": {"n_fit": len(c_fit), "n_calibration": len(c_cal), "recipe": "monitor/offline/texts.py",
                      "calibration_seed": args.seed + 1, "auroc": corruption_auroc, "auroc_by_kind": auroc_by_kind},
        "input": {k: v for k, v in stats.__dict__.items() if k != "problems"},
    }
    if eigentrack is not None:
        offline["eigentrack"] = risk_info
    drift = drift_calibration(info.key, acc, windows, args) if windows else None
    doc = calib.document(
        {(info.key, l): c for l, c in spike_all.layers.items()},
        tap={"window": tap.window, "stride": tap.stride, "proj_dim": tap.proj_dim, "layers": list(tapped)},
        model_fingerprint=dict(fingerprint(info), name=info.key),
        offline=offline,
        risk=live_risk_thresholds(eigentrack, cal_feats, fars[0]) if eigentrack is not None else None,
        drift=drift,
    )
    try:
        calib.save(args.out, doc)
    except OSError as exc:
        raise OfflineError(f"--out: cannot write {args.out!r}: {exc.strerror or exc}") from None
    log(stats.summary("calibrated on", n))
    log(f"eigenwatch calibrate: wrote {args.out} (model {info.key}, layers {list(tapped)}, "
        f"{len(fit_feats)} fit + {n_cal} calibration texts)")
    return 0


def drift_calibration(key: str, moments: TokenMoments, windows: list, args) -> calib.DriftCalibration | None:
    """The "drift" section (rule in the module docstring): references from the fit texts' second
    moments, thresholds from the calibration texts' windows (hooks/sketches.SketchWindow)."""
    from eigenwatch.kernels.sketch import principal_angle_degrees

    out = calib.DriftCalibration(args.drift_every, args.drift_sample, args.drift_persist, margin=args.drift_margin)
    by_layer: dict[int, list] = {}
    for w in windows:
        by_layer.setdefault(w.layer, []).append(w)
    for layer, (_, _, scatter) in sorted(moments.sums.items()):
        wins = by_layer.get(layer, [])
        if len(wins) < MIN_DRIFT_WINDOWS:
            log(f"calibrate: no drift reference for layer {layer}: the calibration texts filled {len(wins)} "
                f"window(s) of {args.drift_every} tokens, fewer than {MIN_DRIFT_WINDOWS}; use more texts or a "
                "smaller --drift-every")
            continue
        ref = np.linalg.eigh(scatter)[1][:, -1]  # [d] top eigenvector of Σ XᵀX (eigh: ascending)
        angles = np.array([principal_angle_degrees(w.directions(1)[0], ref) for w in wins])
        top = float(angles.max())
        alert = min(90.0, max(args.drift_margin * top, 1.0))  # 1°: a floor for a perfectly stable stream
        clear = min(top, alert / args.drift_margin)
        out.layers[(key, layer)] = calib.LayerDrift(ref / np.linalg.norm(ref), alert, clear, len(wins))
        log(f"calibrate: drift layer {layer}: {len(wins)} windows of {args.drift_every} tokens, angle to the "
            f"reference median {np.median(angles):.1f}° max {top:.1f}°: alert above {alert:.1f}° for "
            f"{args.drift_persist} window(s), re-arm below {clear:.1f}°")
    return out if out.layers else None


def risk_model(args, key: str, layers, neg_feats: list[dict], pos_feats: list[dict]):
    """(EigenTrack detector, info) from --risk-model: "auto" trains the GRU on the
    fit split's sequences (label 0) against their corrupted copies (label 1);
    a path loads a model made by `eigenwatch train`; "none": (None, None)."""
    choice = args.risk_model
    if choice == "none":
        return None, None
    if choice != "auto":
        try:
            blob = Path(choice).read_bytes()
            det = EigenTrack.from_onnx(blob, choice)
        except OSError as exc:
            raise OfflineError(f"--risk-model: cannot read {choice!r}: {exc.strerror or exc}") from None
        except RiskModelError as exc:
            raise OfflineError(f"--risk-model: {exc}") from None
        want = (key, tuple(layers), tuple(DESCRIPTOR_NAMES))
        have = (det.risk.model, det.risk.layers, det.risk.descriptor_names)
        if have != want:
            raise OfflineError(f"--risk-model: {choice} was trained for model {have[0]!r} layers {list(have[1])} "
                               f"({len(have[2])} descriptors), not model {key!r} layers {list(layers)} "
                               f"({len(want[2])} descriptors); retrain with `eigenwatch train`")
        return det, {"source": str(choice), "sha256": det.risk.sha256, "trained_by": "eigenwatch train"}
    if len(neg_feats) < 4 or len(pos_feats) < 4:
        log("warning: --risk-model auto: too few texts to train the EigenTrack GRU (need 4 reference and 4 "
            "corrupted in the fit split); calibrating without it")
        return None, None
    from .sequences import Sequences
    from .train import export_onnx, model_meta, train_model

    xs = [f["sequence"] for f in neg_feats] + [f["sequence"] for f in pos_feats]
    keep = [i for i, x in enumerate(xs) if len(x)]
    labels = np.array([0] * len(neg_feats) + [1] * len(pos_feats))
    seqs = Sequences([f"t{i}" for i in keep], labels[keep], [xs[i] for i in keep], key, tuple(layers),
                     tuple(DESCRIPTOR_NAMES))
    net, info = train_model(seqs, hidden=args.gru_hidden, epochs=args.gru_epochs, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eigentrack.onnx"
        export_onnx(net, path, model_meta(seqs, info))
        blob = path.read_bytes()
    det = EigenTrack.from_onnx(blob, "eigentrack (trained by calibrate)")
    log(f"eigenwatch calibrate: EigenTrack GRU trained on {info['n_train']} sequences (epoch {info['best_epoch']} "
        f"kept, picked on {info['n_stop']} set aside): validation AUROC {info['val_auroc']:.3f} "
        f"(reference vs corrupted copies, {info['n_val']} held out)")
    return det, {"source": "auto", "sha256": det.risk.sha256, "trained_by": "eigenwatch calibrate",
                 "val_auroc": info["val_auroc"], "n_train": info["n_train"], "n_stop": info["n_stop"],
                 "n_val": info["n_val"], "best_epoch": info["best_epoch"]}


def live_risk_thresholds(det, cal_feats: list[dict], far: float) -> dict:
    """The live sidecar's hysteresis for the EigenTrack risk: alert when a request's
    risk exceeds alert_high = the (1 − far) conformal quantile of the calibration
    texts' largest per-step risk (so about `far` of in-distribution requests alert
    once); re-arm below clear_low = the median calibration step risk, capped below
    alert_high."""
    risks = det.step_risks(cal_feats)
    peaks = np.sort([float(r.max()) for r in risks if len(r)])
    n = len(peaks)
    k = min(n - 1, int(np.ceil((1 - far) * (n + 1))) - 1)
    high = float(min(peaks[k], 1 - 1e-6))
    low = float(np.median(np.concatenate([r for r in risks if len(r)])))
    low = min(low, 0.5 * high)
    return {"model_sha256": det.risk.sha256, "alert_high": high, "clear_low": max(low, 1e-9), "far": far,
            "n_calibration": n}


def add_args(p) -> None:
    p.add_argument("--model", required=True, help="model directory, or 'tiny' / 'minilm'")
    p.add_argument("--texts", required=True, help="reference texts: JSONL, one {\"id\", \"text\"} per line")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    add_tap_args(p)
    p.add_argument("--far", default="0.01,0.05",
                   help="false-alarm rates; the first is the alert rate of `score` (default %(default)s)")
    p.add_argument("--calib-fraction", type=float, default=0.5,
                   help="share of reference texts held out for conformal calibration (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fit/calibration split, the corruptions and the GRU (default %(default)s)")
    p.add_argument("--voters", default="auto",
                   help="detectors of the combined score: 'auto' (one per source of evidence, README) or a "
                        "comma-separated list of fitted detectors; the live sidecar computes token_mahalanobis, "
                        "hidden_mahalanobis, llmcheck_hidden, token_probe and eigentrack (default %(default)s)")
    p.add_argument("--risk-model", default="auto",
                   help="EigenTrack GRU: 'auto' trains one on the reference texts vs corrupted copies (default), "
                        "a path loads one made by `eigenwatch train`, 'none' leaves it out")
    p.add_argument("--drift-every", type=int, default=4096,
                   help="tokens per top-direction window of the drift detector; must equal the live tap's "
                        "EIGENWATCH_SKETCH_EVERY (default %(default)s; 0: no drift section)")
    p.add_argument("--drift-sample", type=int, default=1,
                   help="one row in N fed to the sketch, as the tap's EIGENWATCH_SKETCH_SAMPLE (default %(default)s)")
    p.add_argument("--drift-margin", type=float, default=1.5,
                   help="drift alert angle = this × the largest calibration window's angle (default %(default)s)")
    p.add_argument("--drift-persist", type=int, default=3,
                   help="windows above the drift angle in a row before an alert (default %(default)s)")
    p.add_argument("--gru-hidden", type=int, default=32, help="GRU width for --risk-model auto (default %(default)s)")
    p.add_argument("--gru-epochs", type=int, default=60,
                   help="most GRU epochs for --risk-model auto; early stopping on a slice of the fit texts picks "
                        "the epoch (default %(default)s)")
