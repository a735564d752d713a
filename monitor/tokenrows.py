"""Per-token rows for the offline detectors that read single tokens
(monitor/transition.py): how a text's rows are kept (a bounded,
evenly spaced subsample per tapped layer, float16) and how arrays travel in a
calibration file (base64 of little-endian float32/float16 with their shape),
with errors that name the field. numpy only.

Only the transformers engine hands these detectors rows (hooks/hf.py's
`row_sink`); the vLLM engine keeps rows inside its worker, so a calibration
with them must be scored with `--engine hf`.
"""

from __future__ import annotations

import base64

import numpy as np

# Rows kept per text and tapped layer: all of a sentence (≈ 15–30 tokens), an evenly
# spaced 64 of a paragraph; bounds the memory `score` holds per text (64 × d × 2 bytes × layers).
MAX_ROWS = 64
FEATURE = "token_rows"


def keep_rows(rows: dict, max_rows: int = MAX_ROWS) -> dict[int, np.ndarray]:
    """{layer: [n, d] rows (torch or numpy)} -> {layer: float16 [min(n, max_rows), d]}, evenly spaced."""
    out = {}
    for layer, x in rows.items():
        x = np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float32)
        if len(x) > max_rows:
            x = x[np.linspace(0, len(x) - 1, max_rows).round().astype(int)]
        out[int(layer)] = x.astype(np.float16)
    return out


def rows_of(feats: list[dict], who: str) -> list[dict[int, np.ndarray]]:
    """Every text's kept rows, or a ValueError that says how to get them."""
    missing = sum(FEATURE not in f for f in feats)
    if missing:
        raise ValueError(f"{who} reads per-token rows, which {missing} of {len(feats)} text(s) lack: only "
                         "`--engine hf` hands them over; calibrate and score with --engine hf")
    return [f[FEATURE] for f in feats]


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pack(a: np.ndarray, dtype=np.float32) -> dict:
    a = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": np.dtype(dtype).name, "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode()}


def unpack(st, where: str) -> np.ndarray:
    """The array of a `pack` dict; ValueError naming `where` when it is damaged."""
    if not isinstance(st, dict) or not {"dtype", "shape", "base64"} <= set(st):
        raise ValueError(f"{where}: expected {{\"dtype\", \"shape\", \"base64\"}}, got {str(st)[:80]!r}; recalibrate")
    if st["dtype"] not in ("float32", "float16"):
        raise ValueError(f"{where}.dtype: expected 'float32' or 'float16', got {st['dtype']!r}")
    shape = st["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise ValueError(f"{where}.shape: expected a list of sizes, got {shape!r}")
    try:
        raw = base64.b64decode(st["base64"], validate=True)
    except (ValueError, TypeError):
        raise ValueError(f"{where}.base64: not base64; recalibrate") from None
    dt = np.dtype(st["dtype"]).newbyteorder("<")
    if len(raw) != int(np.prod(shape)) * dt.itemsize:
        raise ValueError(f"{where}: {len(raw)} bytes do not hold {st['dtype']} {shape}; recalibrate")
    a = np.frombuffer(raw, dtype=dt).reshape(shape).astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{where}: holds NaN/Inf; recalibrate")
    return a
