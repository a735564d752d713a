"""Per-text features for the offline detectors, from what an engine's tap gives
a text (monitor/offline/engines.py): its frames and its token sums. Both
engines go through these functions, so both give the detectors the same
numbers.

A text's features (a dict):

- ``spectra``: {layer: [(eigenvalues / trace_mean, window, dim, sigma2 / trace_mean,
  token_count), ...]}: what the live spectral_spike detector sees of each window;
- ``desc_mean``: per layer the mean descriptor vector, layers concatenated;
- ``sequence``, ``token_counts``: the EigenTrack input (monitor/eigentrack.py);
- ``last_desc`` {layer: descriptors of the final frame}, ``frames`` {layer: count};
- ``pooled``: {layer: mean hidden state Σx/n}; ``llmcheck``: LLM-Check's hidden
  score at the middle tapped layer (monitor/llmcheck.py);
- ``token_maha``: {layer: mean token d²/d}, when the extraction is given a
  fitted TokenMahalanobis (its ``observe`` turns the text's sums into it) or a
  TokenMoments to accumulate the fit texts' sums;
- ``token_rows``: {layer: up to 64 of the text's rows, float16} where the engine's tap
  hands rows over (the hf engine): what layer_transition reads.
"""

from __future__ import annotations

import numpy as np

from eigenwatch.kernels.descriptors import INDEX
from eigenwatch.monitor.eigentrack import frames_to_sequence
from eigenwatch.monitor.llmcheck import llmcheck_rows, middle_layer
from eigenwatch.monitor.spectral_spike import relative
from eigenwatch.monitor.tokenrows import FEATURE as TOKEN_ROWS
from eigenwatch.monitor.tokenrows import keep_rows

from . import log, positive_int
from .texts import InputStats, tokenize


def frame_features(frames, layers: tuple[int, ...]) -> dict | None:
    """The frame-derived features of one text; None when some layer has no frame."""
    i_sig, i_tm = INDEX["sigma2"], INDEX["trace_mean"]
    frames = sorted(frames, key=lambda f: (f.layer, f.token_count, f.final))  # one order for both engines
    spectra: dict[int, list] = {l: [] for l in layers}
    descs: dict[int, list] = {l: [] for l in layers}
    last: dict[int, np.ndarray] = {}
    for f in frames:
        if f.layer not in descs:
            continue
        d = np.asarray(f.descriptors, dtype=np.float64)
        descs[f.layer].append(np.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0))
        last[f.layer] = d
        rel = relative(f.eigenvalues, d[i_sig], d[i_tm])
        if rel is not None:
            spectra[f.layer].append((rel[0], int(f.window), int(f.dim), rel[1], int(f.token_count)))
    if any(not descs[l] for l in layers):
        return None
    counts, seq = frames_to_sequence(frames, layers)
    return {"sequence": seq, "token_counts": counts, "spectra": spectra,
            "desc_mean": np.concatenate([np.mean(descs[l], axis=0) for l in layers]),
            "last_desc": last, "frames": {l: len(descs[l]) for l in layers}}


def sum_features(sums: dict, layers: tuple[int, ...], token=None) -> dict:
    """pooled, llmcheck and (with `token`) token_maha from {layer: (n, Σx, XᵀX, first rows)}."""
    out = {"pooled": {l: sums[l][1] / sums[l][0] for l in layers},
           "llmcheck": llmcheck_rows(sums[middle_layer(layers)][3])}
    if token is not None:
        vals = {l: token.observe(l, *sums[l][:3]) for l in layers}
        vals = {l: v for l, v in vals.items() if v is not None}
        if vals:
            out["token_maha"] = vals
    return out


def _problem(ids, frames, sums, layers) -> str | None:
    if frames is None:
        return "the tap produced no frames"
    if not sums or any(l not in sums for l in layers):
        return "the tap captured no hidden states for some layer"
    if not all(np.isfinite(s).all() and np.isfinite(S).all() for _, s, S, _ in (sums[l] for l in layers)):
        return "NaN/Inf activations"
    rows = [int(sums[l][0]) for l in layers]
    if any(n != len(ids) for n in rows):
        return f"the tap saw {rows} rows of {len(ids)} tokens"
    return None


def extract(engine, info, items, max_length: int | None, stats: InputStats, desc: str,
            token=None) -> tuple[list[str], list[dict]]:
    """Every text through the engine's tap: (ids, features) of the texts that
    gave features; the others are logged and counted in `stats.failed`."""
    prepared = tokenize(info.tokenizer, items, max_length or info.max_positions, stats)
    ids_of = dict(prepared)
    layers = tuple(engine.layers)
    ids_out: list[str] = []
    feats: list[dict] = []
    # Per-token rows for the detectors that read single tokens (monitor/tokenrows.py), where
    # the engine's tap hands them over (the hf engine; vLLM keeps its rows in the worker).
    tap = getattr(engine, "tap", None)
    kept: dict[str, dict] = {}
    if tap is not None and hasattr(tap, "row_sink"):
        tap.row_sink = lambda rid, rows: kept.__setitem__(rid, keep_rows(rows))
    try:
        for rid, frames, sums, why in engine.run(prepared, desc):
            why = why or _problem(ids_of[rid], frames, sums, layers)
            part = None if why else frame_features(frames, layers)
            rows = kept.pop(rid, None)
            if part is None:
                stats.failed += 1
                log(f"skipped: text {rid!r}: {why or 'the tap produced no frame for some layer'}")
                continue
            feats.append(dict(part, **sum_features({l: sums[l] for l in layers}, layers, token)))
            if rows is not None:
                feats[-1][TOKEN_ROWS] = rows
            ids_out.append(rid)
    finally:
        if tap is not None and hasattr(tap, "row_sink"):
            tap.row_sink = None
    return ids_out, feats


def add_tap_args(p) -> None:
    """The tap's settings: `extract` and `calibrate` take the same ones (`score` reads them from CALIB.json)."""
    from .engines import ENGINES

    p.add_argument("--engine", default="hf", choices=ENGINES,
                   help="hf: transformers (default); vllm: the vLLM engine with the same tap")
    p.add_argument("--layers", default=None, help="tapped layers, e.g. 1,2,3 (default: three spread over depth)")
    p.add_argument("--window", type=int, default=32, help="rows per window (default %(default)s)")
    p.add_argument("--stride", type=int, default=16, help="a frame every N tokens (default %(default)s)")
    p.add_argument("--proj-dim", type=int, default=0,
                   help="randomly project rows to this many dims first, as the live tap's EIGENWATCH_PROJ_DIM "
                        "(default 0: off); the sidecar refuses frames of another width than calibrated")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="truncate texts to this many tokens (default: the model's max positions)")


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    from eigenwatch.hooks.config import parse_layers as parse

    from . import OfflineError

    try:
        return parse(text, source="--layers")
    except ValueError as exc:
        raise OfflineError(str(exc)) from None
