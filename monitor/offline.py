"""`eigenwatch calibrate` and `eigenwatch score`: the detectors offline.

Texts go through the same Hugging Face tap as live serving
(`eigenwatch.hooks.hf.HFTap`: same windows, frames and descriptors), plus one
extra forward hook per tapped layer that keeps the whole hidden state of the
current text for the mean-pooled state and the LLM-Check hidden score.

LLM-Check hidden score (Sriramanan et al., 2024), exactly as computed here: at
the middle tapped layer (tapped layers sorted, index len//2), H is the T×d
hidden-state matrix of the text (float64), Z = H − mean over tokens, σ_i the
singular values of Z (i = 1..min(T, d)), and
    score = mean_i ½·log(σ_i² + 1e-3)
i.e. the mean log singular value with a 1e-3 ridge on σ². (Z has rank ≤ T − 1,
so for T ≤ d one term is ½·log 1e-3, the same for every text of that length.)

Calibration splits the (shuffled with a fixed seed) reference texts: the
detectors are fitted on the first part and their scores on the rest are the
conformal calibration scores (split conformal: in-sample scores of a
Mahalanobis fit are far too small when n is not ≫ d). Everything `score` needs
is written into CALIB.json; its "models" section is the live sidecar's format
(`monitor/detectors.py` load_calibration), so `eigenwatch sidecar
--calibration CALIB.json` accepts the same file.

torch / transformers / tqdm are imported inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eigenwatch.monitor.corrupt import corrupt_all
from eigenwatch.monitor.detect import (ALL_DETECTORS, DETECTORS, Combined, TokenMahalanobis, TokenMoments,
                                       combined_voters, corruption_weights)
from eigenwatch.monitor.sequences import frames_to_sequence, sequence_line

CALIBRATION_FORMAT = "eigenwatch.calibration/v1"
PROBE = "The quick brown fox jumps over the lazy dog. 0123456789 éß中文 <|probe|>"
RIDGE = 1e-3
ENGINES = ("hf", "vllm")
# Fewer corrupted calibration texts than this and the voters' AUROCs are too
# noisy to weight by (null s.d. of an AUROC ≈ 0.09 at 20 vs 20): equal weights.
MIN_TEXTS_FOR_WEIGHTS = 20


class OfflineError(Exception):
    """A user-facing error: the CLI prints it and exits 2."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- input texts

@dataclass
class InputStats:
    lines: int = 0
    valid: int = 0
    malformed: int = 0
    empty: int = 0
    truncated: int = 0
    too_short: int = 0  # fewer than 2 tokens: no window, no spectrum
    failed: int = 0  # NaN/Inf activations or another per-text error
    problems: list = field(default_factory=list)

    def summary(self, verb: str, done: int) -> str:
        return (f"eigenwatch: {verb} {done} text(s) from {self.lines} line(s): "
                f"{self.malformed} malformed line(s) skipped, {self.empty} empty text(s) skipped, "
                f"{self.too_short} too-short text(s) skipped, {self.failed} failed, "
                f"{self.truncated} truncated")


def read_jsonl(path: str | Path, stats: InputStats) -> list[tuple[str, str]]:
    """[(id, text)] from a JSONL file; bad lines are reported with their line
    numbers on stderr and skipped; empty texts are reported and counted."""
    path = Path(path)
    try:
        fh = path.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise OfflineError(f"--texts: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    items: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            stats.lines += 1

            def bad(why: str) -> None:
                stats.malformed += 1
                log(f"{path}:{lineno}: skipped: {why}")

            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                bad(f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                bad(f"expected an object with \"id\" and \"text\", got {type(obj).__name__}")
                continue
            rid, text = obj.get("id"), obj.get("text")
            if isinstance(rid, int) and not isinstance(rid, bool):
                rid = str(rid)
            if not isinstance(rid, str) or not rid:
                bad("\"id\" must be a non-empty string")
                continue
            if not isinstance(text, str):
                bad(f"\"text\" must be a string (id {rid!r})")
                continue
            if rid in seen:
                bad(f"duplicate id {rid!r} (first on line {seen[rid]})")
                continue
            seen[rid] = lineno
            if not text.strip():
                stats.empty += 1
                log(f"{path}:{lineno}: skipped: empty text (id {rid!r})")
                continue
            items.append((rid, text))
    stats.valid = len(items)
    if not items:
        raise OfflineError(f"--texts: {path} holds no usable text ({stats.lines} line(s))")
    return items


# ---------------------------------------------------------------- model

@dataclass
class Loaded:
    model: object  # the HF module; None for --engine vllm (vLLM loads the weights itself)
    tokenizer: object
    config: object
    key: str  # the model name in CALIB.json: "tiny"/"minilm" or the directory name
    path: Path
    runner: str  # "generate" or "pooling"
    max_positions: int | None


def model_key(name: str, path: Path) -> str:
    from eigenwatch.hooks.models import MODEL_ALIASES

    return name if name in MODEL_ALIASES else Path(path).resolve().name


def max_positions(cfg, tok) -> int | None:
    """The longest input the model takes: its position table, or the tokenizer's limit if smaller."""
    maxpos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    tmax = getattr(tok, "model_max_length", None)
    if isinstance(tmax, int) and tmax < 10**7:
        maxpos = min(maxpos, tmax) if maxpos else tmax
    return maxpos


def load_model(name: str, engine: str = "hf") -> Loaded:
    """Tokenizer and config always; the HF weights only for --engine hf."""
    from transformers import AutoConfig, AutoTokenizer

    from eigenwatch.hooks.models import resolve_model

    try:
        path, runner = resolve_model(name)
    except (ValueError, RuntimeError) as exc:
        raise OfflineError(str(exc)) from None
    tok = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.from_pretrained(path)
    model = None
    if engine == "hf":
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        cls = AutoModel if runner == "pooling" else AutoModelForCausalLM
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = cls.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return Loaded(model, tok, cfg, model_key(name, path), Path(path), runner, max_positions(cfg, tok))


def fingerprint(loaded: Loaded) -> dict:
    cfg = loaded.config
    raw = (loaded.path / "config.json").read_bytes()
    try:
        canon = json.dumps(json.loads(raw), sort_keys=True).encode()
    except ValueError:
        canon = raw
    ids = loaded.tokenizer(PROBE)["input_ids"][:64]
    return {
        "architecture": (getattr(cfg, "architectures", None) or [getattr(cfg, "model_type", "?")])[0],
        "model_type": getattr(cfg, "model_type", ""),
        "hidden_size": int(getattr(cfg, "hidden_size", 0) or 0),
        "num_layers": int(getattr(cfg, "num_hidden_layers", 0) or 0),
        "vocab_size": int(getattr(cfg, "vocab_size", 0) or 0),
        "config_sha256": hashlib.sha256(canon).hexdigest(),
        "tokenizer_probe_sha256": hashlib.sha256(json.dumps(list(map(int, ids))).encode()).hexdigest(),
    }


def tokenize(tok, items, limit: int | None, stats: InputStats) -> list[tuple[str, list[int]]]:
    """[(id, token ids)]: texts over `limit` tokens truncated (warned, counted),
    texts under 2 tokens skipped (a window needs 2 rows). Both engines use this."""
    out: list[tuple[str, list[int]]] = []
    for rid, text in items:
        enc = tok(text)["input_ids"]
        if limit is not None and len(enc) > limit:
            stats.truncated += 1
            log(f"warning: text {rid!r} has {len(enc)} tokens, truncated to {limit}")
            enc = tok(text, truncation=True, max_length=limit)["input_ids"]
        if len(enc) < 2:
            stats.too_short += 1
            log(f"skipped: text {rid!r} has {len(enc)} token(s); a window needs 2")
            continue
        out.append((rid, [int(t) for t in enc]))
    return out


# ---------------------------------------------------------------- features

def llmcheck_hidden(H: np.ndarray, ridge: float = RIDGE) -> float:
    """mean_i ½·log(σ_i² + ridge), σ_i the singular values of the token-centred T×d matrix H."""
    Z = np.asarray(H, dtype=np.float64)
    Z = Z - Z.mean(axis=0, keepdims=True)
    s = np.linalg.svd(Z, compute_uv=False)
    return float(np.mean(0.5 * np.log(s * s + ridge)))


def frame_features(frames, layers: tuple[int, ...]) -> dict | None:
    """The frame-derived features of one text (both engines): "sequence" and
    "token_counts" (monitor/sequences.py), "spectra" {layer: [(eigenvalues /
    trace_mean, window, dim, sigma2 / trace_mean, token_count)]} and
    "desc_mean" (per layer mean descriptor vector, layers concatenated).
    None when some layer has no frame."""
    from eigenwatch.kernels.descriptors import INDEX

    i_sig, i_tm = INDEX["sigma2"], INDEX["trace_mean"]
    frames = sorted(frames, key=lambda f: (f.layer, f.token_count, f.final))  # one order for both engines
    spectra: dict[int, list] = {l: [] for l in layers}
    descs: dict[int, list] = {l: [] for l in layers}
    for f in frames:
        if f.layer not in descs:
            continue
        tm = float(f.descriptors[i_tm])
        descs[f.layer].append(np.nan_to_num(np.asarray(f.descriptors, dtype=np.float64),
                                            nan=0.0, posinf=0.0, neginf=0.0))
        if tm > 0:
            spectra[f.layer].append((np.asarray(f.eigenvalues, dtype=np.float64) / tm, int(f.window), int(f.dim),
                                     float(f.descriptors[i_sig]) / tm, int(f.token_count)))
    if any(not descs[l] for l in layers):
        return None
    counts, seq = frames_to_sequence(frames, layers)
    return {"sequence": seq, "token_counts": counts, "spectra": spectra,
            "desc_mean": np.concatenate([np.mean(descs[l], axis=0) for l in layers])}


def token_features(token, sums: dict) -> dict:
    """Hand each tapped layer's token sums {layer: (n, Σx, XᵀX)} of one text to
    `token` (detect.TokenMoments accumulates them, a fitted TokenMahalanobis
    returns the text's value); {"token_maha": {layer: value}} when there are
    values, else {}. Both engines call this with the same sums."""
    if token is None:
        return {}
    vals = {l: token.observe(l, *sums[l]) for l in sorted(sums)}
    vals = {l: v for l, v in vals.items() if v is not None}
    return {"token_maha": vals} if vals else {}


def extract(loaded: Loaded, items, layers, window: int, stride: int, max_length: int | None,
            stats: InputStats, desc: str, token=None) -> tuple[list[str], list[dict], tuple[int, ...]]:
    """Run every text through the tap; returns (ids, features, tapped layers).
    With --engine vllm (loaded.model is None) the texts go through vLLM and the
    same tap inside it (monitor/offline_vllm.py). `token`: see token_features."""
    if loaded.model is None:
        from eigenwatch.monitor.offline_vllm import extract_vllm

        return extract_vllm(loaded.path, loaded.runner, loaded.key, items, layers, window, stride,
                            max_length, stats, desc, token)
    import torch
    from tqdm import tqdm

    from eigenwatch.hooks.layers import find_decoder_layers, residual_stream
    from eigenwatch.hooks.hf import HFTap

    try:
        tap = HFTap(loaded.model, layers=layers, window=window, stride=stride, model_name=loaded.key)
    except ValueError as exc:
        raise OfflineError(f"--layers: {exc}") from None
    _, stack = find_decoder_layers(loaded.model)
    captured: dict[int, np.ndarray] = {}

    def pool_hook(idx):
        def hook(module, args, output):
            h = residual_stream(output)
            if h is not None:
                rows = h[0] if h.ndim == 3 else h
                captured[idx] = rows.detach().to(torch.float64).cpu().numpy()
            return None
        return hook

    handles = [stack[i].register_forward_hook(pool_hook(i)) for i in tap.layers]
    mid = tap.layers[len(tap.layers) // 2]
    ids_out: list[str] = []
    feats: list[dict] = []
    prepared = tokenize(loaded.tokenizer, items, max_length or loaded.max_positions, stats)
    try:
        for rid, enc in tqdm(prepared, desc=desc, unit="text", file=sys.stderr, dynamic_ncols=True):
            captured.clear()
            try:
                frames = tap.frames(rid, list(enc))
            except (ValueError, RuntimeError) as exc:
                stats.failed += 1
                log(f"skipped: text {rid!r}: {exc}")
                continue
            part = frame_features(frames, tap.layers)
            if part is None or any(l not in captured for l in tap.layers):
                stats.failed += 1
                log(f"skipped: text {rid!r}: the tap produced no frame for some layer")
                continue
            H = {l: captured[l] for l in tap.layers}
            if not all(np.isfinite(h).all() for h in H.values()):
                stats.failed += 1
                log(f"skipped: text {rid!r}: NaN/Inf activations")
                continue
            sums = {l: (len(h), h.sum(axis=0), h.T @ h) for l, h in H.items()} if token is not None else {}
            feats.append(dict(part, pooled={l: H[l].mean(axis=0) for l in tap.layers},
                              llmcheck=llmcheck_hidden(H[mid]), **token_features(token, sums)))
            ids_out.append(rid)
    finally:
        for h in handles:
            h.remove()
        tap.close()
    return ids_out, feats, tap.layers


# ---------------------------------------------------------------- commands

def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise OfflineError(f"--engine: expected one of {', '.join(ENGINES)}, got {engine!r}")


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    if text is None or text == "":
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise OfflineError(f"--layers: expected comma-separated integers, got {text!r}") from None


def parse_far(text: str) -> list[float]:
    try:
        fars = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OfflineError(f"--far: expected comma-separated rates in (0, 1), got {text!r}") from None
    if not fars or not all(0 < f < 1 for f in fars):
        raise OfflineError(f"--far: expected comma-separated rates in (0, 1), got {text!r}")
    return fars


def calibrate(args) -> int:
    from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES

    check_engine(args.engine)
    layers = parse_layers(args.layers)
    fars = parse_far(args.far)
    if args.window < 2 or args.stride < 1:
        raise OfflineError("--window must be >= 2 and --stride >= 1")
    if not 0 < args.calib_fraction < 1:
        raise OfflineError("--calib-fraction: expected a number in (0, 1)")
    for flag, v in (("--gru-hidden", args.gru_hidden), ("--gru-epochs", args.gru_epochs)):
        if v < 1:
            raise OfflineError(f"{flag}: expected an integer >= 1, got {v}")
    stats = InputStats()
    items = read_jsonl(args.texts, stats)
    loaded = load_model(args.model, args.engine)
    # Split before extracting: the token-level Gaussian is fitted from the fit
    # texts' token sums as they stream past, and only then can the calibration
    # texts be given their token-level distances.
    def too_few(fit: int, cal: int):
        return OfflineError(f"--texts: calibration needs at least 4 usable texts (2 to fit, 2 to calibrate), "
                            f"got {fit + cal} ({fit} + {cal}); see the warnings above for skipped ones")

    if len(items) < 4:
        raise too_few(max(len(items) - 2, 0), min(len(items), 2))
    order = np.random.default_rng(args.seed).permutation(len(items))
    n_cal = min(len(items) - 2, max(2, int(round(len(items) * args.calib_fraction))))
    acc = TokenMoments()
    fit_ids, fit_feats, tapped = extract(loaded, [items[i] for i in order[n_cal:]], layers, args.window,
                                         args.stride, args.max_length, stats, "calibrate: fit", acc)
    if len(fit_feats) < 2:
        raise too_few(len(fit_feats), 0)
    token_det = TokenMahalanobis.from_moments(acc)
    cal_items = [items[i] for i in order[:n_cal]]
    _, cal_feats, _ = extract(loaded, cal_items, tapped, args.window,
                              args.stride, args.max_length, stats, "calibrate: calibration", token_det)
    n, n_cal = len(fit_feats) + len(cal_feats), len(cal_feats)
    if n_cal < 2:
        raise too_few(len(fit_feats), n_cal)
    feats = fit_feats + cal_feats

    # Corrupted copies (monitor/corrupt.py), extracted in one pass (one engine
    # start under vLLM): of each fit text, the GRU's positives (--risk-model auto),
    # and of each calibration text, with another seed, for the combined score's
    # weights. The calibration texts themselves stay untouched for the p-values.
    corrupted_items = []
    if args.risk_model == "auto":
        text_of = dict(items)
        corrupted_fit = corrupt_all([text_of[r] for r in fit_ids], args.seed)
        corrupted_items += [(f"{r}~corrupted", t) for r, t in zip(fit_ids, corrupted_fit)]
    corrupted_cal = corrupt_all([t for _, t in cal_items], args.seed + 1)
    corrupted_items += [(f"{r}~corrupted-cal", t) for (r, _), t in zip(cal_items, corrupted_cal)]
    c_ids, c_feats, _ = extract(loaded, corrupted_items, tapped, args.window, args.stride, args.max_length,
                                InputStats(), "calibrate: corrupted", token_det)
    c_fit = [f for r, f in zip(c_ids, c_feats) if r.endswith("~corrupted")]
    c_cal = [f for r, f in zip(c_ids, c_feats) if r.endswith("~corrupted-cal")]

    detectors = {name: cls().fit(fit_feats) for name, cls in DETECTORS.items()}
    detectors[token_det.name] = token_det
    eigentrack, risk_info = risk_model(args, loaded.key, tapped, fit_feats, c_fit)
    if eigentrack is not None:
        detectors[eigentrack.name] = eigentrack
    cal_scores = {name: d.score(cal_feats) for name, d in detectors.items()}
    voters = combined_voters(cal_scores)
    weights, corruption_auroc = None, {}
    if len(c_cal) >= 2:
        weights, corruption_auroc = corruption_weights({k: cal_scores[k] for k in voters},
                                                       {k: detectors[k].score(c_cal) for k in voters})
    if len(c_cal) < MIN_TEXTS_FOR_WEIGHTS or len(cal_feats) < MIN_TEXTS_FOR_WEIGHTS:
        weights = None
        log(f"calibrate: {len(cal_feats)} calibration texts and {len(c_cal)} corrupted copies, fewer than "
            f"{MIN_TEXTS_FOR_WEIGHTS}: the combined score weights its detectors equally")
    combined = Combined().fit({k: cal_scores[k] for k in voters}, weights=weights)
    log("calibrate: combined score from " + ", ".join(
        f"{k} (weight {combined.weights[k]:.2f}" + (f", AUROC {corruption_auroc[k]:.3f} on corrupted copies)"
                                                   if k in corruption_auroc else ")") for k in voters)
        + f"; reported beside them: {', '.join(sorted(set(cal_scores) - set(voters))) or 'none'}")
    if min(fars) < 1.0 / (n_cal + 1):
        log(f"warning: --far {min(fars)} is below 1/(n+1) = {1 / (n_cal + 1):.4f} for {n_cal} calibration "
            "texts: that rate can never alert; use more reference texts")

    # The live sidecar's section: spectral_spike σ² and thresholds over *all* reference windows.
    from eigenwatch.monitor.detect import SpectralSpike
    spike_all = SpectralSpike().fit(feats)
    doc = {
        "format": CALIBRATION_FORMAT,
        "detector": "spectral_spike",
        "models": {loaded.key: {str(l): c for l, c in sorted(spike_all.layers.items())}},
        "model_fingerprint": dict(fingerprint(loaded), name=loaded.key),
        "offline": {
            "version": 1,
            "engine": args.engine,
            "layers": list(tapped),
            "window": args.window,
            "stride": args.stride,
            "max_length": args.max_length,
            "far": fars,
            "alert_far": fars[0],
            "score_thresholds": {str(f): -math.log10(f) for f in fars},
            "descriptor_names": list(DESCRIPTOR_NAMES),
            "n_reference": n,
            "n_fit": len(fit_feats),
            "n_calibration": n_cal,
            "split_seed": args.seed,
            "llmcheck": {"layer": tapped[len(tapped) // 2], "ridge": RIDGE},
            "detectors": {name: d.state() for name, d in detectors.items()},
            "combined": combined.state(),
            # every detector's scores on the calibration texts (the combined keeps its voters'):
            # per-detector p-values and bench/bench_detect.py --bound read them
            "calibration_scores": {k: v.tolist() for k, v in sorted(cal_scores.items())},
            "corrupted": {"n_fit": len(c_fit), "n_calibration": len(c_cal), "recipe": "monitor/corrupt.py",
                          "calibration_seed": args.seed + 1, "auroc": corruption_auroc},
            "input": {k: v for k, v in stats.__dict__.items() if k != "problems"},
        },
    }
    if eigentrack is not None:
        doc["offline"]["eigentrack"] = risk_info
        doc["risk"] = live_risk_thresholds(eigentrack, cal_feats, fars[0])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(out)
    log(stats.summary("calibrated on", n))
    log(f"eigenwatch calibrate: wrote {out} (model {loaded.key}, layers {list(tapped)}, "
        f"{len(fit_feats)} fit + {n_cal} calibration texts)")
    return 0


def risk_model(args, key: str, layers, neg_feats: list[dict], pos_feats: list[dict]):
    """(EigenTrack detector, info) from --risk-model: "auto" trains the GRU on the
    fit split's sequences (label 0) against their corrupted copies (label 1);
    a path loads a model made by `eigenwatch train`; "none": (None, None)."""
    from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES
    from eigenwatch.monitor.detect import EigenTrack

    choice = args.risk_model
    if choice == "none":
        return None, None
    if choice != "auto":
        from eigenwatch.monitor.risk import RiskModelError

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
    import tempfile

    from eigenwatch.monitor.sequences import Sequences
    from eigenwatch.monitor.train import export_onnx, model_meta, train_model

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


def load_offline_calibration(path: str | Path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise OfflineError(f"--calibration: no such file {str(path)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OfflineError(f"--calibration: {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
        raise OfflineError(f"--calibration: {path}: 'format' must be {CALIBRATION_FORMAT!r}")
    for key in ("offline", "model_fingerprint"):
        if not isinstance(doc.get(key), dict):
            raise OfflineError(f"--calibration: {path} has no {key!r} section: it was not written by "
                               "`eigenwatch calibrate` (a sidecar-only calibration cannot score offline)")
    return doc


def check_fingerprint(doc: dict, loaded: Loaded, path) -> None:
    want = doc["model_fingerprint"]
    have = fingerprint(loaded)
    diff = [k for k in have if want.get(k) != have[k]]
    if diff:
        def short(v):
            return v[:12] + "…" if isinstance(v, str) and len(v) > 16 else v

        detail = "; ".join(f"{k}: calibration {short(want.get(k))!r} vs model {short(have[k])!r}" for k in diff)
        raise OfflineError(
            f"--calibration: {path} was made for model {want.get('name', '?')!r} "
            f"({want.get('architecture', '?')}), not for --model {loaded.key!r} "
            f"({have['architecture']}): {detail}. Recalibrate with `eigenwatch calibrate` on this model.")


def score(args) -> int:
    check_engine(args.engine)
    doc = load_offline_calibration(args.calibration)
    off = doc["offline"]
    stats = InputStats()
    items = read_jsonl(args.texts, stats)
    loaded = load_model(args.model, args.engine)
    check_fingerprint(doc, loaded, args.calibration)
    try:
        detectors = {name: ALL_DETECTORS[name].from_state(st) for name, st in off["detectors"].items()}
        combined = Combined.from_state(off["combined"])
        far = float(off["alert_far"])
    except (KeyError, TypeError, ValueError) as exc:
        raise OfflineError(f"--calibration: {args.calibration}: damaged 'offline' section ({exc!r})") from None
    max_length = args.max_length if args.max_length is not None else off.get("max_length")
    ids, feats, _ = extract(loaded, items, tuple(off["layers"]), int(off["window"]), int(off["stride"]),
                            max_length, stats, "score", detectors.get(TokenMahalanobis.name))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    alerts = 0
    spike = detectors.get("spectral_spike")
    with out.open("w") as fh:
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
                fh.write(json.dumps(line) + "\n")
    log(stats.summary("scored", len(feats)))
    log(f"eigenwatch score: wrote {out}: {len(feats)} line(s), {alerts} alert(s) at false-alarm rate {far}")
    return 0


def extract_sequences(args) -> int:
    """`eigenwatch extract`: descriptor sequences of texts, labelled, for `eigenwatch train`."""
    from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES

    check_engine(args.engine)
    layers = parse_layers(args.layers)
    if args.window < 2 or args.stride < 1:
        raise OfflineError("--window must be >= 2 and --stride >= 1")
    stats = InputStats()
    items = read_jsonl(args.texts, stats)
    loaded = load_model(args.model, args.engine)
    ids, feats, tapped = extract(loaded, items, layers, args.window, args.stride, args.max_length,
                                 stats, "extract")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for rid, f in zip(ids, feats):
            fh.write(sequence_line(rid, args.label, loaded.key, tapped, DESCRIPTOR_NAMES,
                                   f["token_counts"], f["sequence"]) + "\n")
    log(stats.summary("extracted", len(feats)))
    log(f"eigenwatch extract: wrote {out}: {len(feats)} sequence(s), label {args.label}, "
        f"model {loaded.key}, layers {list(tapped)}")
    return 0


def add_tap_args(p) -> None:
    """The tap's settings: `extract` and `calibrate` take the same ones (`score` reads them from CALIB.json)."""
    p.add_argument("--engine", default="hf", choices=ENGINES, help="hf: transformers (default); vllm: the vLLM engine with the same tap")
    p.add_argument("--layers", default=None, help="tapped layers, e.g. 1,2,3 (default: three spread over depth)")
    p.add_argument("--window", type=int, default=32, help="rows per window (default %(default)s)")
    p.add_argument("--stride", type=int, default=16, help="a frame every N tokens (default %(default)s)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate texts to this many tokens (default: the model's max positions)")


def add_extract_args(p) -> None:
    p.add_argument("--model", required=True, help="model directory, or 'tiny' / 'minilm'")
    p.add_argument("--texts", required=True, help="texts: JSONL, one {\"id\", \"text\"} per line")
    p.add_argument("--label", type=int, required=True, choices=[0, 1],
                   help="0: in-distribution texts, 1: shifted / anomalous texts")
    p.add_argument("--out", required=True, help="sequence file to write (JSONL, input of `eigenwatch train`)")
    add_tap_args(p)


def add_calibrate_args(p) -> None:
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
    p.add_argument("--risk-model", default="auto",
                   help="EigenTrack GRU: 'auto' trains one on the reference texts vs corrupted copies (default), "
                        "a path loads one made by `eigenwatch train`, 'none' leaves it out")
    p.add_argument("--gru-hidden", type=int, default=32, help="GRU width for --risk-model auto (default %(default)s)")
    p.add_argument("--gru-epochs", type=int, default=60,
                   help="most GRU epochs for --risk-model auto; early stopping on a slice of the fit texts picks "
                        "the epoch (default %(default)s)")


def add_score_args(p) -> None:
    p.add_argument("--model", required=True, help="model directory, or 'tiny' / 'minilm'")
    p.add_argument("--calibration", required=True, help="CALIB.json written by `eigenwatch calibrate`")
    p.add_argument("--texts", required=True, help="texts to score: JSONL, one {\"id\", \"text\"} per line")
    p.add_argument("--out", required=True, help="SCORES.jsonl to write")
    p.add_argument("--engine", default="hf", choices=ENGINES, help="hf: transformers (default); vllm: the vLLM engine with the same tap")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate texts to this many tokens (default: as calibrated)")


def run(func, args) -> int:
    try:
        return func(args)
    except OfflineError as exc:
        log(f"eigenwatch {args.command}: error: {exc}")
        return 2
