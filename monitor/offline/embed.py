"""Embeddings for `eigenwatch shield fit | eval`: rows from .npy files, or texts run
through an offline engine (hf | vllm) and mean-pooled at one layer, L2-normalised."""

from __future__ import annotations

import numpy as np

from . import OfflineError, log
from .texts import InputStats, read_jsonl


def load_rows(path: str, flag: str, dim: int | None = None) -> np.ndarray:
    """An .npy of embeddings [N, d] as float64, checked: 2-D, real, finite, and of
    width `dim` when given. Raises OfflineError naming `flag`."""
    try:
        x = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise OfflineError(f"{flag}: no such file {path!r}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise OfflineError(f"{flag}: {path} is not a readable .npy array ({exc})") from None
    if not isinstance(x, np.ndarray):  # an .npz archive
        x.close()
        raise OfflineError(f"{flag}: {path} is an .npz archive; pass one array saved with np.save (.npy)")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise OfflineError(f"{flag}: {path}: expected a 2-D array [rows, dim], got shape {tuple(x.shape)}")
    if x.dtype.kind not in "fiu":
        raise OfflineError(f"{flag}: {path}: expected real numbers, got dtype {x.dtype}")
    x = x.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise OfflineError(f"{flag}: {path}: row {bad[0]} contains NaN or Inf ({bad.size} row(s) do)")
    if dim is not None and x.shape[1] != dim:
        raise OfflineError(f"{flag}: {path}: rows have dim {x.shape[1]}, but the shield (--shield) takes {dim}")
    return x


def load_labels(path: str, rows: int) -> np.ndarray:
    """An .npy of `rows` labels in {0, 1}. Raises OfflineError naming --labels."""
    try:
        y = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise OfflineError(f"--labels: no such file {path!r}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise OfflineError(f"--labels: {path} is not a readable .npy array ({exc})") from None
    if not isinstance(y, np.ndarray) or y.shape != (rows,) or y.dtype.kind not in "iub":
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, np.ndarray) else "an .npz archive"
        raise OfflineError(f"--labels: {path}: expected {rows} integer labels (one per --embeddings row), got {got}")
    if not np.isin(y, (0, 1)).all():
        raise OfflineError(f"--labels: {path}: labels must be 0 or 1, got {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    return y.astype(np.int64)


def read_texts(path: str, flag: str) -> list[tuple[str, str]]:
    """[(id, text)] of a texts JSONL (monitor/offline/texts.py). Unlike `calibrate`,
    a malformed line is an error, not a warning: a shield is only as clean as its data."""
    stats = InputStats()
    try:
        items = read_jsonl(path, stats)
    except OfflineError as exc:
        raise OfflineError(str(exc).replace("--texts", flag, 1)) from None
    if stats.malformed:
        raise OfflineError(f"{flag}: {path}: {stats.malformed} malformed line(s), named above with their line "
                           "numbers; fix or remove them")
    return items


def embed_texts(model: str, items: list[tuple[str, str]], engine: str = "hf", layer: int = -1,
                max_length: int | None = None, normalize: bool = True, desc: str = "embed"):
    """(ids, x [N, d] float64, model key): each text's hidden states at `layer`
    (negative: from the last) mean-pooled over its tokens, through the same engines
    and tap as `calibrate` (the tap's token sums Σx/n); L2-normalised unless told
    not to. For a BERT-style model at its last layer that is sentence-transformers'
    mean pooling. Texts the engine fails on are logged and left out."""
    from .engines import Tap, model_info, num_layers, open_engine
    from .features import extract

    info = model_info(model)
    n = num_layers(info.config)
    if n is None:
        raise OfflineError(f"--model: {info.path}/config.json gives no layer count (num_hidden_layers)")
    if not -n <= layer < n:
        raise OfflineError(f"--layer: {layer} is out of range for a model with {n} layers (accepted: {-n}..{n - 1})")
    at = layer % n
    stats = InputStats()
    eng = open_engine(engine, info, Tap(layers=(at,), source="--layer"))
    try:
        ids, feats = extract(eng, info, items, max_length, stats, desc)
    finally:
        eng.close()
    if not feats:
        raise OfflineError(f"--texts: none of the {len(items)} text(s) gave an embedding (see the messages above)")
    x = np.stack([np.asarray(f["pooled"][at], dtype=np.float64) for f in feats])  # [N, d]
    if normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)
    log(f"embedded {len(ids)} of {len(items)} text(s) with {info.key} at layer {at}: {stats.too_short} too short, "
        f"{stats.failed} failed, {stats.truncated} truncated")
    return ids, x, info.key
