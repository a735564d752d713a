"""Per-request sliding windows of hidden rows -> frames: the one windowing path
of both taps (vLLM's, many requests per step; transformers', one text per
forward), so offline calibration and live serving compute the same numbers.

Frames are emitted when a request's row count crosses a multiple of `stride`
(the window is the W rows ending exactly there) and once at the end, so the
frames of a request do not depend on how the engine chunked or batched it.

Inside the host's forward only the window state moves: one `WindowBank` per
tapped layer (kernels/window_bank.py), a decode step is one batched update
per layer, no per-request tensor work. A due frame leaves as a `FrameSeed`
holding its window's raw Gram (W×W); `to_frames` later turns a batch of seeds
into frames with one batched eigensolve (kernels/gram.py) and the
descriptors (kernels/descriptors.py): in the exporter thread for vLLM, inline
for the HF tap. Not thread-safe: the engine thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from eigenwatch.kernels.descriptors import describe_batch
from eigenwatch.kernels.gram import spectra, spectra_np
from eigenwatch.kernels.window_bank import Slots, WindowBank

from .frames import Frame

log = logging.getLogger("eigenwatch.tap")


@dataclass(slots=True)
class FrameSeed:
    """A window copied out of the forward pass, waiting for its spectrum."""

    request_id: str
    engine_request_id: str
    layer: int
    step: int
    token_count: int
    skipped_tokens: int
    final: bool
    gram: torch.Tensor  # [W, W] float32 raw inner products of the window's stored rows (a copy)
    valid: int  # rows of `gram` in use (leading block)
    dim: int  # MP n: d, or the projected k
    scale: float  # eigenvalues are those of the centred gram × scale (1/d)


class _Request:
    __slots__ = ("engine_id", "external_id", "skipped", "slot")

    def __init__(self, engine_id: str, skipped: int, external_id: str, slot: int):
        self.engine_id, self.external_id, self.skipped, self.slot = engine_id, external_id, skipped, slot


class WindowTap:
    """Windows of many requests × layers. `emit` receives FrameSeeds."""

    def __init__(self, window: int, stride: int, max_requests: int, emit: Callable[[FrameSeed], None],
                 proj_dim: int | None = None):
        if window < 2:
            raise ValueError(f"window: a spectrum needs at least 2 rows, got {window}")
        if stride < 1:
            raise ValueError(f"stride: must be >= 1, got {stride}")
        if max_requests < 1:
            raise ValueError(f"max_requests: must be >= 1, got {max_requests}")
        self.window, self.stride, self.max_requests = window, stride, max_requests
        self.emit = emit
        self.proj_dim = proj_dim or None
        self.banks: dict[int, WindowBank] = {}
        self.requests: dict[str, _Request] = {}
        self.slots = Slots(max_requests)
        self.untracked = 0  # requests refused at the limit
        self.rows_seen = 0

    def begin(self, engine_id: str, skipped_tokens: int = 0, external_id: str | None = None) -> bool:
        """Start tracking a request; False (and counted) when at the limit."""
        if engine_id in self.requests:
            return True
        slot = self.slots.alloc()
        if slot is None:
            self.untracked += 1
            return False
        for bank in self.banks.values():
            bank.ensure(slot)
            bank.reset(slot)
        self.requests[engine_id] = _Request(engine_id, skipped_tokens, external_id or engine_id, slot)
        return True

    def tracked(self, engine_id: str) -> bool:
        return engine_id in self.requests

    def _bank(self, layer: int, rows: torch.Tensor) -> WindowBank:
        bank = self.banks.get(layer)
        if bank is None:
            d = rows.shape[1]
            proj = self.proj_dim if self.proj_dim and self.proj_dim < d else None
            # seed=layer: the projection of a layer is the same in every tap of a model.
            bank = self.banks[layer] = WindowBank(self.window, d, proj, max_slots=self.max_requests,
                                                  device=rows.device, seed=layer)
            for req in self.requests.values():
                bank.ensure(req.slot)
        return bank

    def add_layer(self, layer: int, stream: torch.Tensor, items: list[tuple[str, int, int]], step: int) -> None:
        """stream: [N, d] rows of the whole step at one layer; items: (engine id,
        lo, hi) of tracked requests, rows stream[lo:hi] in token order."""
        if not items:
            return
        bank = self._bank(layer, stream)
        w, s = self.window, self.stride
        single = [(self.requests[r], lo) for r, lo, hi in items if hi - lo == 1 and r in self.requests]
        if single:
            # Decode rows: one batched update for every request of the step.
            slots = [req.slot for req, _ in single]
            rows = stream[torch.tensor([lo for _, lo in single], device=stream.device)]
            bank.append(slots, rows)
            self.rows_seen += len(single)
            hit = [req for req, _ in single if bank.count[req.slot] % s == 0 and bank.count[req.slot] >= 2]
            if hit:
                grams, valid = bank.window_gram([req.slot for req in hit])
                for j, req in enumerate(hit):
                    self.emit(self._seed(req, layer, step, bank.count[req.slot], grams[j], valid[j], bank, False))
        for r, lo, hi in items:
            if hi - lo == 1 or r not in self.requests:
                continue
            # A prefill chunk: every boundary inside it gets its window's Gram.
            req = self.requests[r]
            c0 = bank.count[req.slot]
            bounds = [t for t in range((c0 // s + 1) * s, c0 + (hi - lo) + 1, s) if t >= 2]
            self.rows_seen += hi - lo
            for t, g, v in bank.extend(req.slot, stream[lo:hi], bounds):
                full = g.new_zeros((w, w))
                full[:v, :v] = g
                self.emit(self._seed(req, layer, step, t, full, v, bank, False))

    def add_step(self, rows: dict[int, torch.Tensor], items: list[tuple[str, int, int]], step: int) -> None:
        """One engine step: rows {layer: [N, d]} of every tapped layer, the same
        items (engine id, lo, hi) for all of them."""
        for layer in sorted(rows):
            self.add_layer(layer, rows[layer], items, step)

    def finish(self, engine_id: str, step: int) -> None:
        """The request ended: one final frame per layer (its last window), then forget it."""
        req = self.requests.pop(engine_id, None)
        if req is None:
            return
        for layer, bank in sorted(self.banks.items()):
            n = bank.rows_in(req.slot)
            if n >= 2:
                grams, valid = bank.window_gram([req.slot])
                self.emit(self._seed(req, layer, step, n, grams[0], valid[0], bank, True))
            bank.reset(req.slot)
        self.slots.release(req.slot)

    def drop(self, engine_id: str) -> None:
        """Forget a request without frames (preempted: it is recomputed from scratch)."""
        req = self.requests.pop(engine_id, None)
        if req is not None:
            for bank in self.banks.values():
                bank.reset(req.slot)
            self.slots.release(req.slot)

    def _seed(self, req: _Request, layer: int, step: int, count: int, gram: torch.Tensor, valid: int,
              bank: WindowBank, final: bool) -> FrameSeed:
        return FrameSeed(
            request_id=req.external_id, engine_request_id=req.engine_id, layer=layer, step=step,
            token_count=count, skipped_tokens=req.skipped, final=final,
            gram=gram.detach().to(dtype=torch.float32), valid=valid, dim=bank.k, scale=1.0 / bank.dim,
        )


def to_frames(seeds: list[FrameSeed], model: str) -> tuple[list[Frame], list[tuple[FrameSeed, str]]]:
    """Frames of many seeds, and the seeds that gave none with the reason (NaN/Inf
    activations, a window the descriptors refuse). One batched eigensolve for
    all of them, one batched descriptor call per window shape."""
    if not seeds:
        return [], []
    w = max(s.gram.shape[0] for s in seeds)
    valid = np.array([s.valid for s in seeds], dtype=np.int64)
    scale = np.array([s.scale for s in seeds], dtype=np.float64)
    if seeds[0].gram.device.type == "cpu":  # host Grams: numpy (kernels/gram.py says why)
        grams = np.zeros((len(seeds), w, w), dtype=np.float32)
        for i, s in enumerate(seeds):
            n = s.gram.shape[0]
            grams[i, :n, :n] = s.gram.numpy()
        eigs, row_sq, ok = spectra_np(grams, valid, scale)
    else:
        grams = torch.zeros((len(seeds), w, w), dtype=torch.float32, device=seeds[0].gram.device)
        for i, s in enumerate(seeds):
            n = s.gram.shape[0]
            grams[i, :n, :n] = s.gram
        eigs, row_sq, ok = spectra(grams, torch.from_numpy(valid).to(grams.device),
                                   torch.from_numpy(scale).to(grams.device))
        eigs, row_sq, ok = eigs.double().cpu().numpy(), row_sq.double().cpu().numpy(), ok.cpu().numpy()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(seeds):
        if ok[i]:
            groups.setdefault((s.valid, s.dim), []).append(i)
    desc: dict[int, np.ndarray] = {}
    why: dict[int, str] = {i: "window: contains NaN or Inf activations" for i in range(len(seeds)) if not ok[i]}
    for (v, dim), idx in groups.items():
        values, problems = describe_batch(eigs[idx, :v], v, dim, row_sq_norms=row_sq[idx, :v])
        for j, i in enumerate(idx):
            if problems[j] is not None:
                why[i] = problems[j]
            elif not np.all(np.isfinite(values[j])):
                why[i] = "non-finite descriptor"
            else:
                desc[i] = values[j]
    frames = []
    for i, s in enumerate(seeds):
        if i in desc:
            frames.append(Frame(
                request_id=s.request_id, engine_request_id=s.engine_request_id, model=model, layer=s.layer,
                step=s.step, token_count=s.token_count, skipped_tokens=s.skipped_tokens, window=s.valid,
                dim=s.dim, eigenvalues=eigs[i, : s.valid].astype(np.float32), descriptors=desc[i], final=s.final,
            ))
    return frames, [(seeds[i], why[i]) for i in sorted(why)]
