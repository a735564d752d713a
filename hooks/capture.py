"""Per-request token sums at every tapped layer, for the offline detectors:
the row count n, the row sum Σx [d], the scatter XᵀX [d, d] and the first
LLMCHECK_ROWS rows [≤ 256, d], float64 on the CPU. Both taps capture hidden
states this one way (the vLLM worker's capture mode and the HF tap), so both
engines feed the detectors the same numbers: the mean-pooled state is Σx/n,
the token-level Gaussian comes from the scatter (monitor/mahalanobis.py) and
LLM-Check's hidden score from the first rows, as the live tap computes it
(monitor/llmcheck.py, kernels/hidden_stats.py). No other rows are kept.

Off in serving: only `eigenwatch calibrate / score / extract` turn it on.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from eigenwatch.kernels.hidden_stats import LLMCHECK_ROWS

# {layer: (rows, Σx [d], XᵀX [d, d], first rows [min(rows, LLMCHECK_ROWS), d])} of one request, numpy float64.
Sums = dict


class _Request:
    __slots__ = ("layers", "broken")

    def __init__(self):
        self.layers: dict[int, list] = {}  # layer -> [rows, Σx, XᵀX, [first rows]] (torch float64, CPU)
        self.broken = False  # an update failed half-way: the sums are not trustworthy

    def result(self) -> Sums:
        return {layer: (int(a[0]), a[1].numpy(), a[2].numpy(), torch.cat(a[3]).numpy())
                for layer, a in sorted(self.layers.items())}


class TokenSums:
    """Running sums of tracked requests; finished ones wait to be popped (the
    oldest are evicted past `max_done`, counted in `evicted`)."""

    def __init__(self, max_done: int = 512):
        self.live: dict[str, _Request] = {}
        self.done: OrderedDict[str, _Request] = OrderedDict()
        self.max_done = max_done
        self.evicted = 0

    def add(self, layer: int, stream: torch.Tensor, items: list[tuple[str, int, int]]) -> None:
        """stream: [N, d] rows of one step at one layer; items: (request id, lo, hi)."""
        try:
            rows = stream.detach().to(device="cpu", dtype=torch.float64)  # [N, d]
            if rows.ndim != 2:
                raise ValueError(f"stream: expected rows [N, d], got shape {tuple(rows.shape)}")
            for rid, lo, hi in items:
                req = self.live.get(rid)
                if req is None:
                    req = self.live[rid] = _Request()
                if req.broken:
                    continue
                x = rows[lo:hi]  # [m, d]
                acc = req.layers.get(layer)
                if acc is None:  # the first rows: the products themselves, no zeroed [d, d] to add into
                    req.layers[layer] = [x.shape[0], x.sum(dim=0), x.T @ x, [x[:LLMCHECK_ROWS].clone()]]
                    continue
                if acc[0] < LLMCHECK_ROWS:
                    acc[3].append(x[:LLMCHECK_ROWS - acc[0]].clone())
                acc[0] += x.shape[0]
                acc[1].add_(x.sum(dim=0))
                acc[2].addmm_(x.T, x)
        except Exception:
            for rid, _, _ in items:  # some sums of these requests may miss rows now
                self.live.setdefault(rid, _Request()).broken = True
            raise

    def finish(self, rid: str) -> None:
        req = self.live.pop(rid, None)
        if req is not None:
            self.done[rid] = req
            while len(self.done) > self.max_done:
                self.done.popitem(last=False)
                self.evicted += 1

    def drop(self, rid: str) -> None:
        self.live.pop(rid, None)

    def pop(self, request_ids, alias=None) -> dict[str, Sums | None]:
        """{id: sums} for each asked id that has sums (finished first, then live),
        None where they broke; their state is dropped. `alias(key)` maps a stored
        key to another id it may be asked by (vLLM's client id for an engine id)."""
        out: dict[str, Sums | None] = {}
        for store in (self.done, self.live):
            other = {alias(k): k for k in store} if alias is not None else {}
            for want in request_ids:
                if want in out:
                    continue
                key = want if want in store else other.get(want)
                if key is None or key not in store:
                    continue
                req = store.pop(key)
                out[want] = None if req.broken else req.result()
        return out

    def clear(self) -> None:
        self.live.clear()
        self.done.clear()

    def __len__(self) -> int:
        return len(self.live) + len(self.done)
