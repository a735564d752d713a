"""What the sidecar accepts from a client, checked before anything is stored: the
per-frame limits (README "Limits"), a frame's fields and values, a batch's
descriptor names, FrameColumns blocks; and the batched conversions of the hot
path (a batch's spectrum frames or Grams to float64 arrays, checked and
spike-counted together). Problems come back as (field, why) for the message
that names the field; nothing here raises on a client's input."""

from __future__ import annotations

import itertools
import math

import numpy as np

from eigenwatch.kernels.descriptors import describe_windows
from eigenwatch.kernels.gram import spectra_np
from eigenwatch.monitor.spectral_spike import SpikeDetector
from eigenwatch.monitor.sidecar.signatures import check_terms
from eigenwatch.v1 import monitor_pb2

REQUIRED_DESCRIPTORS = ("sigma2", "trace_mean", "spectral_entropy", "lambda1")
# The largest window a frame may send as a centred Gram (the tap's own limit):
# its eigensolve runs here, O(W³).
MAX_GRAM_WINDOW = 1024
# Per-frame limits, checked before anything of a frame is stored (README "Limits").
MAX_WINDOW = 1024  # rows per window, so eigenvalues per frame
MAX_DIM = 1 << 20  # row width d
MAX_LAYER = 65535  # decoder-layer index
MAX_ID_CHARS = 256  # request_id, engine_request_id, tap_id
MAX_LABEL_CHARS = 128  # model (a Prometheus label value)
MAX_DESCRIPTORS = 64  # descriptor_names per batch (this version sends 23)
MAX_NAME_CHARS = 64  # one descriptor name
def clip(text: str, limit: int = 80) -> str:
    """A client's string for a log line or an error message: escaped (no newline or control
    character can forge a line) and cut to `limit` characters, quoted."""
    text = str(text)
    short = text if len(text) <= limit else text[:limit]
    out = repr(short)
    return out if short is text else f"{out}… ({len(text)} chars)"


def check_labels(f: monitor_pb2.Frame) -> tuple[str, str] | None:
    """(field, problem) when a frame's ids or labels are over the limits."""
    for name in ("request_id", "engine_request_id"):
        if len(getattr(f, name)) > MAX_ID_CHARS:
            return name, f"at most {MAX_ID_CHARS} characters, got {len(getattr(f, name))}"
    if len(f.model) > MAX_LABEL_CHARS:
        return "model", f"at most {MAX_LABEL_CHARS} characters (a Prometheus label), got {len(f.model)}"
    if not f.model.isprintable():
        return "model", "must be printable text (no newline or control character)"
    if f.layer > MAX_LAYER:
        return "layer", f"must be <= {MAX_LAYER}, got {f.layer}"
    return None


def check_names(names) -> str | None:
    """The problem with a batch's descriptor_names, None when they are within the limits."""
    if len(names) > MAX_DESCRIPTORS:
        return f"descriptor_names: at most {MAX_DESCRIPTORS} names, got {len(names)}"
    for n in names:
        if len(n) > MAX_NAME_CHARS or not n.isprintable():
            return (f"descriptor_names: {clip(n, 32)} is not a descriptor name (printable, at most "
                    f"{MAX_NAME_CHARS} characters)")
    return None


def gram_spectra(frames) -> dict[int, tuple[np.ndarray, np.ndarray] | str]:
    """Eigenvalues and descriptors of the frames that carry a centred Gram:
    {index: (eigs [W] float64, descriptors [D] float64) or why the window gives
    none}. One batched eigensolve and descriptor call per window size
    (kernels/gram.py, kernels/descriptors.py: the functions the tap's
    `to_frames` uses). Frames must be valid (validate_frame) already."""
    by_window: dict[int, list[int]] = {}
    for j, f in frames:
        by_window.setdefault(f.window, []).append(j)
    index = dict(frames)
    out: dict[int, tuple[np.ndarray, np.ndarray] | str] = {}
    for w, idx in by_window.items():
        grams = np.frombuffer(b"".join(index[j].centred_gram for j in idx), dtype="<f4").reshape(len(idx), w, w)
        eigs, desc, why = gram_rows(grams, [index[j].dim for j in idx])
        for i, j in enumerate(idx):
            out[j] = why[i] if why[i] is not None else (eigs[i], desc[i])
    return out


def gram_rows(grams: np.ndarray, dims) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Centred Grams [n, W, W] float32 of width `dims` [n] -> (eigs [n, W], descriptors [n, D]
    float64, why [n]: None, or why that window gives no spectrum). One batched eigensolve and
    one descriptor call: the functions the tap's `to_frames` uses."""
    n, w, _ = grams.shape
    eigs, row_sq, ok = spectra_np(grams, w, 1.0, centred=True)
    desc, why = describe_windows(eigs, row_sq, ok, np.full(n, w), dims)
    return eigs, desc, why


def validate_frame(f: monitor_pb2.Frame, n_names: int, eigs: np.ndarray | None = None,
                   desc: np.ndarray | None = None, index_of: dict[str, int] | None = None,
                   values_checked: bool = False) -> tuple[str, str] | None:
    """(field, problem) for a malformed frame, None when it is fine. `eigs` and
    `desc` are the frame's values as float64 arrays, when the caller has them;
    `index_of` (descriptor name -> position) enables the physical checks;
    `values_checked`: the caller ran the value checks already (spectrum_batch)."""
    if f.window > MAX_WINDOW:
        return "window", f"at most {MAX_WINDOW} rows, got {f.window}"
    if f.dim > MAX_DIM:
        return "dim", f"must be <= {MAX_DIM}, got {f.dim}"
    if not f.request_id:
        return "request_id", "must not be empty"
    if not f.engine_request_id:
        return "engine_request_id", "must not be empty"
    if not f.model:
        return "model", "must not be empty"
    if f.layer < 0:
        return "layer", f"must be >= 0, got {f.layer}"
    if f.window < 2:
        return "window", f"must be >= 2 (a single row has no spectrum), got {f.window}"
    if f.dim < 1:
        return "dim", f"must be >= 1, got {f.dim}"
    if f.token_count < 0 or f.skipped_tokens < 0:
        return "token_count", "token_count and skipped_tokens must be >= 0"
    if f.HasField("signature") and (why := check_terms(f.signature)) is not None:
        return "signature", why
    if f.centred_gram:
        if f.eigenvalues or f.descriptors:
            return "centred_gram", "set either centred_gram or eigenvalues and descriptors, not both"
        if f.window > MAX_GRAM_WINDOW:
            return "window", f"a centred_gram frame takes at most {MAX_GRAM_WINDOW} rows, got {f.window}"
        if len(f.centred_gram) != 4 * f.window * f.window:
            return "centred_gram", (f"has {len(f.centred_gram)} bytes but window {f.window} needs "
                                    f"{4 * f.window * f.window} (float32 [window × window])")
        return None
    if len(f.eigenvalues) != f.window:
        return "eigenvalues", f"has {len(f.eigenvalues)} values but window is {f.window}"
    if len(f.descriptors) != n_names:
        return "descriptors", f"has {len(f.descriptors)} values but descriptor_names has {n_names}"
    if values_checked:
        return None
    eigs = np.asarray(f.eigenvalues, dtype=np.float64) if eigs is None else eigs
    desc = np.asarray(f.descriptors, dtype=np.float64) if desc is None else desc
    return value_problem(eigs, desc, index_of)


VARIANCES = ("sigma2", "trace_mean", "lambda1")  # descriptors that are variances: never negative


def value_problem(eigs: np.ndarray, desc: np.ndarray, index_of: dict[str, int] | None) -> tuple[str, str] | None:
    """(field, problem) for one frame's values, eigs [W] and desc [D] float64; None when fine.
    `index_of` (descriptor name -> position) enables the variance check."""
    # One reduction each on the hot path: the float64 sum of float32 values cannot overflow,
    # so it is finite exactly when every value is.
    if not math.isfinite(eigs.sum()):
        return "eigenvalues", "contains NaN or Inf"
    if not np.isfinite(desc).all():
        return "descriptors", "contains NaN or Inf"
    # Physically impossible values: a Gram matrix has no negative eigenvalue (float32
    # rounding aside), and variances are >= 0.
    if eigs.size and (lo := float(eigs.min())) < 0 and lo < -1e-3 * float(np.abs(eigs).max()):
        return "eigenvalues", f"a Gram matrix has no negative eigenvalues, got {lo:.6g}"
    if index_of is not None:
        for name in VARIANCES:
            i = index_of.get(name)
            if i is not None and desc[i] < 0:
                return "descriptors", f"{name} is a variance and cannot be negative, got {float(desc[i]):.6g}"
    return None


def bad_value_rows(eigs: np.ndarray, desc: np.ndarray, index_of: dict[str, int]) -> np.ndarray:
    """value_problem for many frames at once, eigs [n, W] and desc [n, D] float64 -> [n] bool,
    True where value_problem finds a problem (it then names it)."""
    variances = [index_of[n] for n in VARIANCES if n in index_of]
    with np.errstate(invalid="ignore", over="ignore"):
        lo = eigs.min(axis=1)
        bad = ~np.isfinite(eigs.sum(axis=1)) | ~np.isfinite(desc).all(axis=1)
        bad |= (lo < 0) & (lo < -1e-3 * np.abs(eigs).max(axis=1))
        if variances:
            bad |= (desc[:, variances] < 0).any(axis=1)
    return bad


def spectrum_batch(frames, skip, n_names: int, index_of: dict[str, int], detector: SpikeDetector) -> dict[int, tuple]:
    """A batch's spectrum frames (eigenvalues and descriptors, no centred Gram), converted and
    checked together rather than one by one (the hot path of Ingest: per-frame numpy on 32
    values costs more than the values): {index: (eigs [W] float64, desc [D] float64, problem,
    spike)} with validate_frame's answer and a SpikeResult (None: pass the frame to
    `detector.observe`). Frames in `skip`, and frames whose value counts do not match their
    window and descriptor_names, are left out: validate_frame alone names their problem."""
    by_window: dict[int, list] = {}
    for j, f in enumerate(frames):
        if j in skip or f.centred_gram:
            continue
        w = f.window
        if 2 <= w <= MAX_WINDOW and len(f.eigenvalues) == w and len(f.descriptors) == n_names:
            by_window.setdefault(w, []).append((j, f))
    out: dict[int, tuple] = {}
    chain = itertools.chain.from_iterable
    for w, group in by_window.items():
        fs = [f for _, f in group]
        n = len(fs)
        eigs = np.fromiter(chain([f.eigenvalues for f in fs]), np.float64, count=n * w).reshape(n, w)
        desc = np.fromiter(chain([f.descriptors for f in fs]), np.float64, count=n * n_names).reshape(n, n_names)
        # validate_frame's value checks, row-wise (a row that fails any gets validate_frame's message)
        bad = bad_value_rows(eigs, desc, index_of).tolist()
        problems = [validate_frame(f, n_names, eigs[i], desc[i], index_of) if bad[i] else
                    validate_frame(f, n_names, values_checked=True) for i, f in enumerate(fs)]
        ok = [i for i, p in enumerate(problems) if p is None]
        spikes = count_spikes(detector, ok, [(f.model, f.layer) for f in fs], eigs, w, [f.dim for f in fs], desc,
                              index_of)
        for i, (j, _) in enumerate(group):
            out[j] = (eigs[i], desc[i], problems[i], spikes[i])
    return out


def count_spikes(detector: SpikeDetector, ok: list[int], keys, eigs: np.ndarray, window: int, dims, desc: np.ndarray,
                 index_of: dict[str, int]) -> list:
    """SpikeResults of the rows `ok` of frames of one window size (keys [n] (model, layer), eigs
    [n, W], dims [n], desc [n, D]) in one detector call; [n], None where the detector needs the
    frame on its own (`observe`: a layer still calibrating, another width, a row not in ok)."""
    spikes: list = [None] * len(keys)
    if ok and "trace_mean" in index_of:
        found = detector.observe_calibrated([keys[i] for i in ok], eigs[ok], [window] * len(ok),
                                            [dims[i] for i in ok], desc[ok, index_of["trace_mean"]])
        for i, res in zip(ok, found):
            spikes[i] = res
    return spikes


def unusable_reason(why: str) -> str:
    return "nonfinite" if "NaN" in why or "non-finite" in why else "degenerate"




def check_columns(c: monitor_pb2.FrameColumns, n_names: int) -> tuple[str, str] | None:
    """(field, problem) for a FrameColumns block that is malformed as a whole (none of its
    frames is kept: its columns do not line up); None when its shape holds. Per-frame
    problems are column_problems' and the values' (bad_value_rows)."""
    n = len(c.layer)
    for name in ("request", "step", "token_count", "dim"):
        if (k := len(getattr(c, name))) != n:
            return name, f"has {k} values but layer has {n} (one each per frame)"
    m = len(c.engine_request_ids)
    if len(c.request_ids) != m or len(c.skipped_tokens) != m:
        return "request_ids", (f"request_ids, engine_request_ids and skipped_tokens have {len(c.request_ids)}, {m} "
                               f"and {len(c.skipped_tokens)} values: one each per request")
    if not c.model:
        return "model", "must not be empty"
    if len(c.model) > MAX_LABEL_CHARS:
        return "model", f"at most {MAX_LABEL_CHARS} characters (a Prometheus label), got {len(c.model)}"
    if not c.model.isprintable():
        return "model", "must be printable text (no newline or control character)"
    w = c.window
    if c.centred_grams:
        if not 2 <= w <= MAX_GRAM_WINDOW:
            return "window", f"must be 2..{MAX_GRAM_WINDOW} rows for centred_grams, got {w}"
        if c.eigenvalues or c.descriptors:
            return "centred_grams", "set either centred_grams or eigenvalues and descriptors, not both"
        if len(c.centred_grams) != 4 * n * w * w:
            return "centred_grams", (f"has {len(c.centred_grams)} bytes but {n} frames of window {w} need "
                                     f"{4 * n * w * w} (float32 [frames × window × window])")
    else:
        if not 2 <= w <= MAX_WINDOW:
            return "window", f"must be 2..{MAX_WINDOW} rows (a single row has no spectrum), got {w}"
        if len(c.eigenvalues) != 4 * n * w:
            return "eigenvalues", (f"has {len(c.eigenvalues)} bytes but {n} frames of window {w} need {4 * n * w} "
                                   "(float32 [frames × window])")
        if len(c.descriptors) != 8 * n * n_names:
            return "descriptors", (f"has {len(c.descriptors)} bytes but {n} frames of {n_names} descriptor_names "
                                   f"need {8 * n * n_names} (float64 [frames × names])")
    for name in ("request_ids", "engine_request_ids"):
        for k, v in enumerate(getattr(c, name)):
            if not v:
                return name, f"[{k}] must not be empty"
            if len(v) > MAX_ID_CHARS:
                return name, f"[{k}]: at most {MAX_ID_CHARS} characters, got {len(v)}"
    if m and min(c.skipped_tokens) < 0:
        return "skipped_tokens", "must be >= 0"
    if n and (top := max(c.request)) >= m:
        return "request", f"a position in request_ids ({m} of them) must be < {m}, got {top}"
    if c.final and (top := max(c.final)) >= n:
        return "final", f"a frame position ({n} frames) must be < {n}, got {top}"
    return None


def column_problems(layer: np.ndarray, dim: np.ndarray, count: np.ndarray) -> dict[int, tuple[str, str]]:
    """validate_frame's per-frame field checks over a FrameColumns block's columns ([n] each):
    {frame position: (field, problem)} for the frames that fail one."""
    bad = (layer < 0) | (layer > MAX_LAYER) | (dim < 1) | (dim > MAX_DIM) | (count < 0)
    out = {}
    for i in np.flatnonzero(bad).tolist():
        if not 0 <= layer[i] <= MAX_LAYER:
            out[i] = "layer", f"must be 0..{MAX_LAYER}, got {int(layer[i])}"
        elif not 1 <= dim[i] <= MAX_DIM:
            out[i] = "dim", f"must be 1..{MAX_DIM}, got {int(dim[i])}"
        else:
            out[i] = "token_count", f"must be >= 0, got {int(count[i])}"
    return out
