"""The frame: one window's spectrum and descriptors, as taps send it and as the
sidecar and the offline tools read it, and its protobuf forms (eigenwatch.v1:
Frame, and FrameColumns for many frames at once).

numpy + protobuf only: the sidecar imports this module without torch.
Defaults both ends of the wire share live here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES, INDEX
from eigenwatch.v1 import monitor_pb2

# Where the sidecar listens unless told otherwise (taps send there by default).
DEFAULT_SIDECAR = "127.0.0.1:50151"
# gRPC message size limit on both ends: a FrameBatch of one engine step at 512
# requests × 3 layers × ~400 bytes is ~600 KB; 16 MiB leaves room for W = 1024.
MAX_MESSAGE_BYTES = 16 << 20


@dataclass(slots=True)
class Frame:
    request_id: str  # the id the client knows
    engine_request_id: str  # vLLM's internal id (unique per engine)
    model: str
    layer: int
    step: int  # tap-local engine step of the window's last row
    token_count: int  # rows of this request seen at this layer so far
    skipped_tokens: int  # prompt rows served from the prefix cache (never seen)
    window: int  # rows W in the window
    dim: int  # MP n: the row width d, or the projected k
    eigenvalues: np.ndarray  # [W] float32, descending
    descriptors: np.ndarray  # [D] float64, in `names` order
    final: bool  # the request's last frame
    names: tuple[str, ...] = DESCRIPTOR_NAMES  # what `descriptors` holds, in order
    signature: tuple | None = None  # (ids, weights) of the request's lexical signature, final frame only
    # (rows, token_sqdist, pooled_sqdist, llmcheck or None, calibration id, probe_logit or None): hooks/hidden.py,
    # on final frames and, as the running value, on a step's last frame per request and layer
    hidden: tuple | None = None

    def descriptor(self, name: str) -> float:
        i = INDEX[name] if self.names is DESCRIPTOR_NAMES else self.names.index(name)
        return float(self.descriptors[i])


def to_proto(frame: Frame) -> monitor_pb2.Frame:
    return monitor_pb2.Frame(
        request_id=frame.request_id,
        engine_request_id=frame.engine_request_id,
        model=frame.model,
        layer=frame.layer,
        step=frame.step,
        token_count=frame.token_count,
        skipped_tokens=frame.skipped_tokens,
        window=frame.window,
        dim=frame.dim,
        eigenvalues=frame.eigenvalues.tolist(),
        descriptors=frame.descriptors.tolist(),
        final=frame.final,
        signature=sparse_terms(frame.signature),
        hidden=hidden_stats(frame.hidden),
    )


def hidden_stats(values) -> monitor_pb2.HiddenStats | None:
    """(rows, token_sqdist, pooled_sqdist, llmcheck or None, calibration id[, probe_logit or None])
    -> HiddenStats; None -> None."""
    if values is None:
        return None
    rows, token, pooled, llm, cal = values[:5]
    msg = monitor_pb2.HiddenStats(rows=int(rows), token_sqdist=float(token), pooled_sqdist=float(pooled),
                                  calibration=cal)
    if llm is not None:
        msg.llmcheck = float(llm)
    if len(values) > 5 and values[5] is not None:
        msg.probe_logit = float(values[5])
    return msg


def sparse_terms(signature) -> monitor_pb2.SparseTerms | None:
    """(ids [k], weights [k]) as numpy arrays or tensors (hooks/signatures.py) -> SparseTerms,
    terms of weight 0 left out; None -> None."""
    if signature is None:
        return None
    ids, weights = (np.asarray(t.cpu().numpy() if hasattr(t, "cpu") else t) for t in signature[:2])
    keep = weights > 0
    return monitor_pb2.SparseTerms(ids=ids[keep].tolist(), weights=weights[keep].tolist(),
                                   vocab_size=int(signature[2]) if len(signature) > 2 else 0)


def from_proto(f: monitor_pb2.Frame, names: tuple[str, ...], eigs: np.ndarray | None = None,
               desc: np.ndarray | None = None) -> Frame:
    """A wire frame as a Frame; `names` are its batch's descriptor_names (not checked here:
    the sidecar validates frames first, see monitor/sidecar/server.py). eigs and desc:
    the values the sidecar computed for a frame that carried its centred Gram."""
    return Frame(
        request_id=f.request_id, engine_request_id=f.engine_request_id, model=f.model, layer=f.layer,
        step=f.step, token_count=f.token_count, skipped_tokens=f.skipped_tokens, window=f.window, dim=f.dim,
        eigenvalues=np.asarray(f.eigenvalues if eigs is None else eigs, dtype=np.float32),
        descriptors=np.asarray(f.descriptors if desc is None else desc, dtype=np.float64), final=f.final,
        names=DESCRIPTOR_NAMES if tuple(names) == DESCRIPTOR_NAMES else tuple(names),
        signature=((np.asarray(f.signature.ids, dtype=np.int64), np.asarray(f.signature.weights, dtype=np.float32),
                    f.signature.vocab_size) if f.HasField("signature") else None),
        hidden=((f.hidden.rows, f.hidden.token_sqdist, f.hidden.pooled_sqdist,
                 f.hidden.llmcheck if f.hidden.HasField("llmcheck") else None, f.hidden.calibration)
                if f.HasField("hidden") else None),
    )


def column_blocks(model: str, items, windows, values) -> list[monitor_pb2.FrameColumns]:
    """FrameColumns blocks of one model, one per window size. `items`: objects with a
    frame's scalar fields (Frame, hooks.windows.FrameSeed), `windows` their window sizes;
    `values(window, group)` -> the block's value fields (eigenvalues and descriptors, or
    centred_grams) as a dict of bytes. Frames keep their order within a window size, and
    blocks go smallest window first: a request's window only grows (up to W) as its rows
    come, so its frames reach the sidecar in token order."""
    by_window: dict[int, list] = {}
    for it, w in zip(items, windows):
        by_window.setdefault(w, []).append(it)
    out = []
    for w, group in sorted(by_window.items()):
        ids: dict[str, int] = {}  # engine id -> position in the block's request lists
        req, eng, ext, skipped = [], [], [], []
        for it in group:
            k = ids.get(it.engine_request_id)
            if k is None:
                k = ids[it.engine_request_id] = len(eng)
                eng.append(it.engine_request_id)
                ext.append(it.request_id)
                skipped.append(it.skipped_tokens)
            req.append(k)
        out.append(monitor_pb2.FrameColumns(
            model=model, window=w, request_ids=ext, engine_request_ids=eng, skipped_tokens=skipped, request=req,
            layer=[it.layer for it in group], step=[it.step for it in group],
            token_count=[it.token_count for it in group], dim=[it.dim for it in group],
            final=[i for i, it in enumerate(group) if it.final], **values(w, group)))
    return out


def rich_requests(items) -> set[str]:
    """The engine ids of the requests with a signature or hidden-state statistics on any of
    these frames (or seeds). All of such a request's frames in a batch go as Frame messages:
    the sidecar applies a batch's Frame messages first, then its column blocks, so a request
    split between the two would reach it out of order (a final frame before the windows
    that preceded it, when the exporter merges steps; a running value before a plain window
    of the same step)."""
    return {it.engine_request_id for it in items if it.signature is not None or it.hidden is not None}


def batch(frames: list[Frame], stats: monitor_pb2.TapStats | None = None) -> monitor_pb2.FrameBatch:
    """One FrameBatch message (this version's descriptor names) for a step's frames, column by
    column (FrameColumns, one block per model and window size); the frames of a request with
    a signature or hidden-state statistics on any of them (`rich_requests`), or of other
    descriptor names, go as Frame messages, in their order."""
    plain: dict[str, list[Frame]] = {}
    rest = []
    rich = rich_requests(f for f in frames if f.names == DESCRIPTOR_NAMES)
    rich |= {f.engine_request_id for f in frames if f.names != DESCRIPTOR_NAMES}
    for f in frames:
        if f.engine_request_id not in rich:
            plain.setdefault(f.model, []).append(f)
        else:
            rest.append(f)

    def values(w: int, group: list[Frame]) -> dict:
        return {"eigenvalues": np.stack([f.eigenvalues for f in group]).astype("<f4", copy=False).tobytes(),
                "descriptors": np.stack([f.descriptors for f in group]).astype("<f8", copy=False).tobytes()}

    blocks = [b for model, fs in plain.items() for b in column_blocks(model, fs, [f.window for f in fs], values)]
    return monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, frames=[to_proto(f) for f in rest],
                                  columns=blocks, stats=stats)
