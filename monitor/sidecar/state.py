"""Per-request state in the sidecar, bounded in count, in age and in bytes (the
request store, per-layer state, the fixed-size histories reports show), and the
admission of label values (`LabelGuard`: a cap on distinct models and (model,
layer) pairs, so no client can grow Prometheus' series or the per-key state
without bound).

Bytes are an estimate kept as state is created (`RequestStore.held`): each
layer is charged its whole history (--report-history rows) when it first
appears, so the estimate is an upper bound that never needs a walk over the
store; eviction brings it back under the memory budget."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


class History:
    """The last `cap` (token_count, vector) pairs, oldest first, in one array
    that grows by doubling up to `cap` rows: a short request costs a few rows,
    the longest ones cap·width values. Descriptor histories are float32 (256 ×
    23 descriptors ≈ 24 KB per layer; the window's eigenvalues travel as float32
    anyway); risk histories are float64 (width 1)."""

    __slots__ = ("cap", "counts", "values", "n", "head")

    def __init__(self, cap: int, width: int, dtype=np.float32):
        self.cap = cap
        size = max(1, min(cap, 8))
        self.counts = np.zeros(size, dtype=np.int64)
        self.values = np.zeros((size, width), dtype=dtype)
        self.n = 0  # rows filled
        self.head = 0  # next row to write once the ring is full (n == cap)

    def append(self, count: int, vec: np.ndarray) -> None:
        if self.cap <= 0:
            return
        if self.n < self.cap:
            if self.n == len(self.counts):
                size = min(self.cap, 2 * self.n)
                counts = np.empty(size, dtype=self.counts.dtype)
                counts[:self.n] = self.counts
                values = np.empty((size, self.values.shape[1]), dtype=self.values.dtype)
                values[:self.n] = self.values
                self.counts, self.values = counts, values
            self.counts[self.n] = count
            self.values[self.n] = vec
            self.n += 1
            return
        self.counts[self.head] = count
        self.values[self.head] = vec
        self.head = (self.head + 1) % self.cap

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(token_counts [n], values [n, width]), oldest first."""
        if self.n < self.cap or self.head == 0:
            return self.counts[:self.n], self.values[:self.n]
        order = np.r_[self.head:self.cap, 0:self.head]
        return self.counts[order], self.values[order]


# slots: no per-instance __dict__, so a store of thousands of requests gives the
# garbage collector's full passes half the objects to walk (bench_sidecar's p99).
@dataclass(slots=True)
class LayerState:
    frames: int = 0
    token_count: int = 0
    window: int = 0
    dim: int = 0
    last_descriptors: np.ndarray | None = None
    last_eigenvalues: np.ndarray | None = None
    max_spikes: int = 0
    over_streak: int = 0  # consecutive frames over the spike threshold
    history: History | None = None  # last frames' descriptors, for reports


@dataclass(slots=True)
class RequestState:
    engine_request_id: str
    request_id: str
    model: str
    skipped_tokens: int = 0
    finished: bool = False
    updated: float = field(default_factory=time.monotonic)
    layers: dict[int, LayerState] = field(default_factory=dict)
    alerts: list = field(default_factory=list)  # monitor_pb2.Alert
    fired: dict = field(default_factory=dict)  # (detector, layer) -> highest severity raised
    descriptor_names: tuple[str, ...] | None = None  # order of the descriptor values kept (first batch's)
    risk: object = None  # sidecar/risk.RequestRisk when the risk model scores this request
    combined: object = None  # sidecar/combined.RequestCombined once a final frame brought hidden-state statistics
    signature: tuple | None = None  # (layer, ids, weights, best similarity, best match): sidecar/signatures.py
    bytes: int = 0  # estimated memory held (RequestStore.charge)


# Estimated bytes of the Python objects around the arrays (dicts, dataclasses, strings):
# measured with tracemalloc on this version, rounded up.
REQUEST_BYTES = 2048
LAYER_BYTES = 1024
ALERT_BYTES = 512


def layer_bytes(history_rows: int, width: int, window: int) -> int:
    """What one layer of one request may hold: its whole history (charged up front), the last
    descriptors (float64) and eigenvalues (float32)."""
    return LAYER_BYTES + history_rows * (8 + 4 * width) + 8 * width + 4 * window


class LabelGuard:
    """Admits label values: at most `max_models` distinct models and `max_pairs` distinct (model,
    layer) pairs, first come first served, for the process's lifetime (their Prometheus series
    live that long). `admit` returns None or why not ("models" / "layers")."""

    def __init__(self, max_models: int, max_pairs: int):
        self.max_models = max_models
        self.max_pairs = max_pairs
        self.models: set[str] = set()
        self.pairs: set[tuple[str, int]] = set()

    def admit_model(self, model: str) -> str | None:
        if model in self.models:
            return None
        if len(self.models) >= self.max_models:
            return "models"
        self.models.add(model)
        return None

    def admit(self, model: str, layer: int) -> str | None:
        key = (model, layer)
        if key in self.pairs:
            return None
        if model not in self.models and len(self.models) >= self.max_models:
            return "models"
        if len(self.pairs) >= self.max_pairs:
            return "layers"
        self.models.add(model)
        self.pairs.add(key)
        return None


class RequestStore:
    """Keyed by vLLM's engine request id (unique); also found by the client's id.
    Bounded by count (max_requests) and by estimated bytes (budget_bytes, with
    `charge` and `enforce`); unfinished requests are counted per model as they
    change (no walk over the store per new request)."""

    def __init__(self, max_requests: int = 10_000, idle_timeout_s: float = 900.0, budget_bytes: int | None = None):
        self.max_requests = max_requests
        self.idle_timeout_s = idle_timeout_s
        self.budget_bytes = budget_bytes
        self._by_engine: OrderedDict[str, RequestState] = OrderedDict()
        self._by_external: dict[str, str] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # finished requests, oldest first: evicted first
        self.active: dict[str, int] = {}  # model -> unfinished requests
        self.held = 0  # estimated bytes of all request states
        self.on_evict = None  # callback(state, reason)
        self.on_finish = None  # callback(state) when the idle sweep closes a request
        self.on_active = None  # callback(model) when its count of unfinished requests changed

    def __len__(self) -> int:
        return len(self._by_engine)

    def get(self, request_id: str) -> RequestState | None:
        st = self._by_engine.get(request_id)
        if st is None and request_id in self._by_external:
            st = self._by_engine.get(self._by_external[request_id])
        if st is None and f"{request_id}-0" in self._by_external:
            # vLLM's OpenAI server runs completion "cmpl-X" as engine request
            # "cmpl-X-0" (one per prompt): the response id finds its first prompt.
            st = self._by_engine.get(self._by_external[f"{request_id}-0"])
        return st

    def get_or_create(self, engine_id: str, request_id: str, model: str, skipped: int) -> tuple[RequestState, bool]:
        st = self._by_engine.get(engine_id)
        if st is not None:
            self._by_engine.move_to_end(engine_id)
            st.updated = time.monotonic()
            return st, False
        while len(self._by_engine) >= self.max_requests:
            self._evict_one("capacity")
        st = RequestState(engine_request_id=engine_id, request_id=request_id, model=model, skipped_tokens=skipped)
        self._by_engine[engine_id] = st
        self._by_external[request_id] = engine_id
        self.charge(st, REQUEST_BYTES + len(engine_id) + len(request_id) + len(model))
        self._count(model, 1)
        return st, True

    def charge(self, st: RequestState, nbytes: int) -> None:
        st.bytes += nbytes
        self.held += nbytes

    def enforce(self, keep: RequestState | None = None) -> int:
        """Evict (finished first, then least recently updated) until the estimate is under the
        budget; `keep` (the request being updated) goes last. Returns how many were evicted."""
        n = 0
        while self.budget_bytes is not None and self.held > self.budget_bytes and self._by_engine:
            if len(self._by_engine) == 1 and keep is not None and keep.engine_request_id in self._by_engine:
                break  # one request over the budget alone: its frames are refused instead (server.py)
            self._evict_one("memory", keep)
            n += 1
        return n

    def finish(self, st: RequestState) -> bool:
        """Mark a request finished; True if it was not already."""
        if st.finished:
            return False
        st.finished = True
        if st.engine_request_id in self._by_engine:
            self._finished[st.engine_request_id] = None
            self._count(st.model, -1)
        return True

    def _count(self, model: str, delta: int) -> None:
        n = self.active.get(model, 0) + delta
        if n:
            self.active[model] = n
        else:
            self.active.pop(model, None)
        if self.on_active is not None:
            self.on_active(model)

    def active_by_model(self) -> dict[str, int]:
        return dict(self.active)

    def _remove(self, st: RequestState, reason: str) -> None:
        self._by_engine.pop(st.engine_request_id, None)
        self._finished.pop(st.engine_request_id, None)
        if self._by_external.get(st.request_id) == st.engine_request_id:
            del self._by_external[st.request_id]
        self.held -= st.bytes
        if not st.finished:
            self._count(st.model, -1)
        if self.on_evict is not None:
            self.on_evict(st, reason)

    def _evict_one(self, reason: str, keep: RequestState | None = None) -> None:
        # Oldest finished request first; else the least recently updated one (O(1) either way).
        if self._finished:
            self._remove(self._by_engine[next(iter(self._finished))], reason)
            return
        it = iter(self._by_engine.values())
        st = next(it)
        if st is keep:
            st = next(it, st)
        self._remove(st, reason)

    def sweep(self, now: float | None = None) -> int:
        """Requests whose tap went silent (crashed worker, lost final frame) are
        closed after idle_timeout_s, and kept for reports until evicted."""
        now = time.monotonic() if now is None else now
        n = 0
        for st in list(self._by_engine.values()):
            if not st.finished and now - st.updated > self.idle_timeout_s:
                self.finish(st)
                n += 1
                if self.on_finish is not None:
                    self.on_finish(st)
        return n
