"""Per-request state in the sidecar, bounded in count and in age (the request
store, per-layer state, and the fixed-size histories reports show)."""

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
                self.counts = np.resize(self.counts, size)
                self.values = np.resize(self.values, (size, self.values.shape[1]))
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


@dataclass
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


@dataclass
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


class RequestStore:
    """Keyed by vLLM's engine request id (unique); also found by the client's id."""

    def __init__(self, max_requests: int = 10_000, idle_timeout_s: float = 900.0):
        self.max_requests = max_requests
        self.idle_timeout_s = idle_timeout_s
        self._by_engine: OrderedDict[str, RequestState] = OrderedDict()
        self._by_external: dict[str, str] = {}
        self.on_evict = None  # callback(state, reason)
        self.on_finish = None  # callback(state) when the idle sweep closes a request

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
            self._evict_one()
        st = RequestState(engine_request_id=engine_id, request_id=request_id, model=model, skipped_tokens=skipped)
        self._by_engine[engine_id] = st
        self._by_external[request_id] = engine_id
        return st, True

    def active_by_model(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for st in self._by_engine.values():
            if not st.finished:
                out[st.model] = out.get(st.model, 0) + 1
        return out

    def _remove(self, st: RequestState, reason: str) -> None:
        self._by_engine.pop(st.engine_request_id, None)
        if self._by_external.get(st.request_id) == st.engine_request_id:
            del self._by_external[st.request_id]
        if self.on_evict is not None:
            self.on_evict(st, reason)

    def _evict_one(self) -> None:
        # Oldest finished request first; else the least recently updated one.
        for st in self._by_engine.values():
            if st.finished:
                self._remove(st, "capacity")
                return
        self._remove(next(iter(self._by_engine.values())), "capacity")

    def sweep(self, now: float | None = None) -> int:
        """Requests whose tap went silent (crashed worker, lost final frame) are
        closed after idle_timeout_s, and kept for reports until evicted."""
        now = time.monotonic() if now is None else now
        n = 0
        for st in list(self._by_engine.values()):
            if not st.finished and now - st.updated > self.idle_timeout_s:
                st.finished = True
                n += 1
                if self.on_finish is not None:
                    self.on_finish(st)
        return n
