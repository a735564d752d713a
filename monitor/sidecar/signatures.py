"""Lexical signatures in the sidecar (Sparton, issue 14): the two file formats, the
numpy sparse head, the signature index and the live `signature_match` detector.

- Signature index (`--signatures sigs.npz`, written by `eigenwatch signatures add`):
  the top-k terms of known-bad texts' signatures, read by the model's own head at one
  layer (hooks/signatures.py), the threshold calibrated on ordinary texts, and the
  vocabulary's token strings.
- Sparse head (`--sparse-head head.npz`, written by `eigenwatch signatures head`):
  the model's unembedding W [V, D], its bias, its final norm and its vocabulary, for
  the Sparse service's SparseEncode (monitor/sidecar/sparse_service.py).

Both are versioned .npz files written atomically (monitor/files.py) and read
without pickle. `encode` is the numpy twin of
kernels/sparton.py's `sparse_head` (vocab-tiled, no [tokens × vocab] logits);
tests/test_signatures.py checks one against the other.

`signature_match`: a request's signature (its final frame of the signature layer,
Frame.signature) is L2-normalised and compared with every index entry by a sparse
dot product (cosine similarity over the kept terms); above the index's threshold the
request gets one `signature_match` alert (severity warning) through the alert hub.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os

import numpy as np

from eigenwatch.monitor.files import write_atomic
from eigenwatch.v1 import monitor_pb2

from .alerts import WARNING

log = logging.getLogger("eigenwatch.sidecar.signatures")

DETECTOR = "signature_match"
INDEX_FORMAT = "eigenwatch.signatures/v1"
HEAD_FORMAT = "eigenwatch.sparse-head/v1"
NORMS = ("none", "rms", "layer")
TILE_BYTES = 8 << 20  # logits of one vocab tile in encode(), float32


class SignatureFileError(ValueError):
    """A --signatures or --sparse-head file that cannot be used; the message names the flag and the fix."""


# --------------------------------------------------------------------------- files


def save_npz(path: str, arrays: dict) -> None:
    """Write arrays to `path` atomically (monitor/files.py: a reader finds the old file or the new one)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def _read(path: str, flag: str, fmt: str, writer: str) -> tuple[dict, str]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise SignatureFileError(f"{flag}: no such file {path!r}; write one with `{writer}`") from None
    except OSError as exc:
        raise SignatureFileError(f"{flag}: cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as exc:
        raise SignatureFileError(f"{flag}: {path} is not a readable .npz ({exc}); write one with `{writer}`") from None
    got = str(arrays.get("format", ""))
    if got != fmt:
        raise SignatureFileError(f"{flag}: {path} has format {got or 'none'!r}, expected {fmt!r} "
                                 f"(write one with `{writer}`)")
    return arrays, hashlib.sha256(raw).hexdigest()


def _vocab(arrays: dict, v: int, flag: str, path: str) -> np.ndarray | None:
    vocab = arrays.get("vocab")
    if vocab is None or vocab.size == 0:
        return None
    if vocab.shape != (v,) or vocab.dtype.kind != "U":
        raise SignatureFileError(f"{flag}: {path}: vocab must hold {v} token strings, got {vocab.dtype} "
                                 f"{tuple(vocab.shape)}")
    return vocab


class SparseHead:
    """A --sparse-head file: W [V, D] float32, bias [V] | None, the final norm, the vocabulary."""

    def __init__(self, path: str, flag: str = "--sparse-head"):
        a, self.sha256 = _read(path, flag, HEAD_FORMAT, "eigenwatch signatures head")
        self.path = os.path.abspath(path)
        w = a.get("weight")
        if w is None or w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1 or w.dtype.kind != "f":
            raise SignatureFileError(f"{flag}: {path}: weight must be a float [V, D] matrix, got "
                                     f"{None if w is None else (w.dtype, tuple(w.shape))}")
        self.weight = np.ascontiguousarray(w, dtype=np.float32)
        self.vocab_size, self.dim = self.weight.shape
        self.bias = self._vec(a, "bias", self.vocab_size, flag, path)
        self.norm = str(a.get("norm", "none"))
        if self.norm not in NORMS:
            raise SignatureFileError(f"{flag}: {path}: norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        self.norm_weight = self._vec(a, "norm_weight", self.dim, flag, path)
        self.norm_bias = self._vec(a, "norm_bias", self.dim, flag, path)
        self.norm_eps = float(a.get("norm_eps", 1e-6))
        if self.norm != "none" and self.norm_weight is None:
            raise SignatureFileError(f"{flag}: {path}: norm {self.norm!r} needs norm_weight [{self.dim}]")
        if not np.isfinite(self.weight).all():
            raise SignatureFileError(f"{flag}: {path}: weight contains NaN or Inf")
        self.vocab = _vocab(a, self.vocab_size, flag, path)
        self.model = str(a.get("model", ""))
        self.source = str(a.get("source", ""))

    @staticmethod
    def _vec(a: dict, name: str, n: int, flag: str, path: str) -> np.ndarray | None:
        x = a.get(name)
        if x is None or x.size == 0:
            return None
        if x.shape != (n,) or x.dtype.kind != "f" or not np.isfinite(x).all():
            raise SignatureFileError(f"{flag}: {path}: {name} must hold {n} finite floats, got {x.dtype} "
                                     f"{tuple(x.shape)}")
        return x.astype(np.float32)

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """rows [M, D] float32 -> the head's input (the final norm, as hooks/signatures.py Head.normalise)."""
        if self.norm == "rms":
            x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(self.norm_eps)) * self.norm_weight
        elif self.norm == "layer":
            mu = x.mean(-1, keepdims=True)
            var = ((x - mu) ** 2).mean(-1, keepdims=True)
            x = (x - mu) / np.sqrt(var + np.float32(self.norm_eps)) * self.norm_weight
            if self.norm_bias is not None:
                x = x + self.norm_bias
        return x.astype(np.float32, copy=False)


def save_head(path: str, head: dict, vocab: list[str] | None, model: str) -> None:
    """head: hooks/signatures.py Head.export() (float32 arrays, norm, eps, source)."""
    arrays = {"format": np.array(HEAD_FORMAT), "model": np.array(model), "source": np.array(head["source"]),
              "weight": head["weight"], "norm": np.array(head["norm"]), "norm_eps": np.array(head["norm_eps"])}
    for name in ("bias", "norm_weight", "norm_bias"):
        if name in head:
            arrays[name] = head[name]
    if vocab is not None:
        arrays["vocab"] = np.array(vocab, dtype=str)
    save_npz(path, arrays)


def encode(head: SparseHead, hidden: np.ndarray, mask: np.ndarray | None = None,
           tile_bytes: int = TILE_BYTES) -> np.ndarray:
    """hidden [B, S, D] float32, mask [B, S] (nonzero = the token counts) -> w [B, V] float32:
    w[b, v] = max over kept tokens of log1p(relu(norm(h) · W[v] + bias[v])), 0 where none is positive.
    Vocab-tiled: at most `tile_bytes` of logits at a time."""
    B, S, D = hidden.shape
    keep = np.ones((B, S), dtype=bool) if mask is None else np.asarray(mask) != 0
    counts = keep.sum(1)
    rows = head.normalise(np.ascontiguousarray(hidden[keep], dtype=np.float32))  # [M, D], batch-major
    V = head.vocab_size
    best = np.full((B, V), -np.inf, dtype=np.float32)
    has = np.flatnonzero(counts)
    if rows.shape[0]:
        starts = np.concatenate([[0], np.cumsum(counts[has])[:-1]])
        vt = max(64, min(V, tile_bytes // (4 * rows.shape[0]) // 64 * 64))
        for v0 in range(0, V, vt):
            logits = rows @ head.weight[v0:v0 + vt].T  # [M, vt]
            best[has, v0:v0 + vt] = np.maximum.reduceat(logits, starts, axis=0)
    if head.bias is not None:
        best += head.bias  # constant over tokens: after the max, as the torch path does
    np.maximum(best, 0, out=best)
    return np.log1p(best, out=best)


def top_terms(w: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """w [B, V] -> per row (ids, weights) of its k largest terms of weight > 0, descending (k = 0: all)."""
    out = []
    for row in w:
        pos = np.flatnonzero(row > 0)
        if k and pos.size > k:
            pos = pos[np.argpartition(row[pos], -k)[-k:]]
        order = pos[np.argsort(-row[pos], kind="stable")]
        out.append((order.astype(np.int64), row[order].astype(np.float32)))
    return out


# --------------------------------------------------------------------------- the index


class SignatureIndex:
    """A --signatures file: N signatures' kept terms, L2-normalised, and the threshold."""

    def __init__(self, path: str, flag: str = "--signatures"):
        a, self.sha256 = _read(path, flag, INDEX_FORMAT, "eigenwatch signatures add")
        self.path = os.path.abspath(path)
        ids, weights = a.get("ids"), a.get("weights")
        if ids is None or weights is None or ids.ndim != 2 or ids.shape != weights.shape or ids.shape[0] < 1:
            raise SignatureFileError(f"{flag}: {path}: ids and weights must be [N, k] arrays of one shape with N >= 1")
        if ids.dtype.kind not in "iu" or weights.dtype.kind != "f":
            raise SignatureFileError(f"{flag}: {path}: ids must be integers and weights floats, got "
                                     f"{ids.dtype} and {weights.dtype}")
        self.vocab_size = int(a.get("vocab_size", 0))
        if self.vocab_size < 1 or (ids >= self.vocab_size).any() or (ids < 0).any():
            raise SignatureFileError(f"{flag}: {path}: ids must lie in [0, vocab_size={self.vocab_size})")
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise SignatureFileError(f"{flag}: {path}: weights must be finite and >= 0")
        self.threshold = float(a.get("threshold", np.nan))
        if not 0 < self.threshold <= 1:
            raise SignatureFileError(f"{flag}: {path}: threshold must be a cosine similarity in (0, 1], got "
                                     f"{self.threshold}")
        self.ids = ids.astype(np.int64)
        norms = np.linalg.norm(weights.astype(np.float64), axis=1, keepdims=True)
        self.weights = (weights / np.maximum(norms, 1e-30)).astype(np.float32)  # [N, k], unit rows
        self.names = [str(x) for x in a.get("names", np.arange(len(ids)).astype(str))]
        self.model = str(a.get("model", ""))
        self.layer = int(a.get("layer", -1))
        self.vocab = _vocab(a, self.vocab_size, flag, path)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def match(self, ids: np.ndarray, weights: np.ndarray) -> tuple[float, int]:
        """(highest cosine similarity to an entry, that entry) for one signature's kept terms."""
        norm = float(np.linalg.norm(weights))
        if norm == 0:
            return 0.0, -1
        dense = np.zeros(self.vocab_size, dtype=np.float32)  # O(V) scratch, O(N·k) products
        dense[ids] = weights / norm
        sims = (dense[self.ids] * self.weights).sum(1)
        best = int(np.argmax(sims))
        return float(sims[best]), best


def similarities(a: tuple[np.ndarray, np.ndarray], index_ids: np.ndarray, index_w: np.ndarray,
                 vocab_size: int) -> np.ndarray:
    """Cosine similarities of one signature (ids, weights) to index rows [N, k] (unit rows)."""
    ids, w = a
    dense = np.zeros(vocab_size, dtype=np.float64)
    dense[ids] = w / max(float(np.linalg.norm(w)), 1e-30)
    return (dense[index_ids] * index_w).sum(1)


def check_terms(t: monitor_pb2.SparseTerms) -> str | None:
    """What is wrong with a frame's signature, None when nothing is."""
    if len(t.ids) != len(t.weights):
        return f"has {len(t.ids)} ids but {len(t.weights)} weights"
    if t.vocab_size < 1:
        return "vocab_size: must be >= 1"
    if t.ids and max(t.ids) >= t.vocab_size:
        return f"ids: {max(t.ids)} is not below vocab_size {t.vocab_size}"
    w = np.asarray(t.weights, dtype=np.float32)
    if not np.isfinite(w).all() or (w < 0).any():
        return "weights: must be finite and >= 0"
    return None


class SignatureMatcher:
    """The live side: keeps each request's signature for its report and raises
    `signature_match` when it is close to an index entry."""

    def __init__(self, cfg, alerts):
        self.alerts = alerts
        self.index = SignatureIndex(cfg.signatures) if getattr(cfg, "signatures", None) else None
        self.vocab = self.index.vocab if self.index is not None else None
        self._warned: set[tuple] = set()

    def use_vocab(self, head) -> None:
        """Decode report terms with the --sparse-head's vocabulary when the index has none."""
        if self.vocab is None and head is not None and head.vocab is not None and (
                self.index is None or self.index.vocab_size == head.vocab_size):
            self.vocab = head.vocab

    def observe(self, st, f: monitor_pb2.Frame) -> None:
        """A frame that carries a (validated) signature."""
        ids = np.asarray(f.signature.ids, dtype=np.int64)
        w = np.asarray(f.signature.weights, dtype=np.float32)
        best, name = 0.0, ""
        idx = self.index
        if idx is not None:
            why = None
            if f.signature.vocab_size != idx.vocab_size:
                why = f"vocabulary of {f.signature.vocab_size} terms, the index's has {idx.vocab_size}"
            elif idx.layer >= 0 and f.layer != idx.layer:
                why = f"layer {f.layer}, the index was made at layer {idx.layer}"
            if why is None:
                best, j = idx.match(ids, w)
                name = idx.names[j] if j >= 0 else ""
            elif (f.model, why) not in self._warned:
                self._warned.add((f.model, why))
                log.warning("--signatures: model %s sends signatures of %s: not matched (set the tap's "
                            "EIGENWATCH_SIGNATURE_LAYER and model to the index's, or rebuild it)", f.model, why)
        st.signature = (f.layer, ids, w, best, name)
        if idx is not None and best > idx.threshold and (DETECTOR, -1) not in st.fired:
            st.fired[(DETECTOR, -1)] = WARNING
            self.alerts.raise_alert(st, DETECTOR, WARNING, best, idx.threshold,
                                    f"lexical signature at layer {f.layer} matches known-bad signature {name!r} "
                                    f"(cosine {best:.3f} > {idx.threshold:.3f})", f.layer, f.token_count)

    def report(self, st, rep: monitor_pb2.Report, top: int = 32) -> None:
        sig = getattr(st, "signature", None)
        if sig is None:
            return
        layer, ids, w, best, name = sig
        vocab = self.vocab
        terms = [monitor_pb2.SignatureTerm(id=int(i), weight=float(x),
                                           token=str(vocab[i]) if vocab is not None and i < len(vocab) else "")
                 for i, x in zip(ids[:top], w[:top])]
        rep.signature.CopyFrom(monitor_pb2.SignatureReport(layer=layer, terms=terms, best_similarity=best,
                                                           best_match=name))
