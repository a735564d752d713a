"""Per-request sliding windows of hidden rows -> frames: the one windowing path
of both taps (vLLM's, many requests per step; transformers', one text per
forward), so offline calibration and live serving compute the same numbers.

Frames are emitted when a request's row count crosses a multiple of `stride`
(the window is the W rows ending exactly there) and once at the end, so the
frames of a request do not depend on how the engine chunked or batched it.

Inside the host's forward only the window state moves: one `WindowBank` per
group of tapped layers (kernels/window_bank.py): a decode step is one
batched copy of every request's and layer's new row, no per-request tensor
work; at a stride boundary one batched product gives the due windows'
centred Grams. A due frame leaves as a `FrameSeed` holding its window's
centred Gram (W×W); `to_frames` later turns a batch of seeds
into frames with one batched eigensolve (kernels/gram.py) and the
descriptors (kernels/descriptors.py): in the exporter thread for vLLM, inline
for the HF tap. Not thread-safe: the engine thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from eigenwatch.kernels.descriptors import describe_windows
from eigenwatch.kernels.gram import spectra, spectra_np
from eigenwatch.kernels.window_bank import Slots, WindowBank, host_index

from .frames import Frame
from .hidden import part_values

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
    gram: torch.Tensor  # [W, W] float32 centred Gram of the window's stored rows
    valid: int  # rows of `gram` in use (leading block)
    dim: int  # MP n: d, or the projected k
    scale: float  # eigenvalues are those of the centred gram × scale (1/d)
    signature: tuple | None = None  # (ids [k], weights [k]) tensors on a final frame (hooks/signatures.py)
    hidden: object = None  # hooks/hidden.HiddenPart on a final frame (the tap has a calibration)


class _Request:
    __slots__ = ("engine_id", "external_id", "skipped", "slot")

    def __init__(self, engine_id: str, skipped: int, external_id: str, slot: int):
        self.engine_id, self.external_id, self.skipped, self.slot = engine_id, external_id, skipped, slot


class WindowTap:
    """Windows of many requests × layers. `emit` receives FrameSeeds. The layers
    handed over together in `add_step` share one multi-layer WindowBank (one
    batched update per step for all of them)."""

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
        self.banks: dict[tuple[int, ...], WindowBank] = {}  # layer group -> its bank
        self.requests: dict[str, _Request] = {}
        self.slot_of: dict[str, int] = {}  # engine id -> slot, for array lookups per step
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
        self.slot_of[engine_id] = slot
        return True

    def tracked(self, engine_id: str) -> bool:
        return engine_id in self.requests

    def _bank(self, group: tuple[int, ...], stream: torch.Tensor) -> WindowBank:
        bank = self.banks.get(group)
        if bank is None:
            taken = [l for g in self.banks for l in g if l in group]
            if taken:
                raise ValueError(f"layers {taken} already have windows in another group; hand the same layers "
                                 "to add_step every step")
            d = stream.shape[-1]
            proj = self.proj_dim if self.proj_dim and self.proj_dim < d else None
            # Projection seeded by the layer index: the same in every tap of a model.
            bank = self.banks[group] = WindowBank(self.window, d, proj, layers=group, max_slots=self.max_requests,
                                                  device=stream.device)
            for req in self.requests.values():
                bank.ensure(req.slot)
        return bank

    def add_layer(self, layer: int, stream: torch.Tensor, items: list[tuple[str, int, int]], step: int) -> None:
        """One layer's rows of a step: `add_step` for a group of one layer."""
        self.add_step({layer: stream}, items, step)

    def add_step(self, rows: dict[int, torch.Tensor], items: list[tuple[str, int, int]], step: int) -> None:
        """One engine step: rows {layer: [N, d]} of the tapped layers (all of the
        same width), and items (engine id, lo, hi) of tracked requests whose rows
        are stream[lo:hi] at every layer, in token order."""
        if not items or not rows:
            return
        group = tuple(sorted(rows))
        stack = torch.stack([rows[l] for l in group]) if len(group) > 1 else rows[group[0]][None]  # [L, N, d]
        bank = self._bank(group, stack)
        w, s = self.window, self.stride
        # The step's bookkeeping as arrays: one entry per item, no Python loop per request.
        n = len(items)
        ids, lo, hi = zip(*items)
        lo = np.fromiter(lo, np.int64, n)
        hi = np.fromiter(hi, np.int64, n)
        slot = np.fromiter(map(self.slot_of.get, ids, repeat(-1)), np.int64, n)  # -1: not tracked
        single = np.flatnonzero((hi - lo == 1) & (slot >= 0))
        if single.size:
            # Decode rows: one batched update for every request and layer of the step.
            slots = slot[single]
            bank.append(slots, stack[:, host_index(lo[single], stack.device)])
            self.rows_seen += int(single.size) * len(group)
            count = bank.count[slots]
            hit = np.flatnonzero((count % s == 0) & (count >= 2))
            if hit.size:
                grams, valid = bank.window_gram(slots[hit])  # [L, H, W, W]
                for j, i in enumerate(hit.tolist()):
                    req = self.requests[ids[single[i]]]
                    for li, layer in enumerate(group):
                        self.emit(self._seed(req, layer, step, int(count[i]), grams[li, j], valid[j], bank, False))
        for i in np.flatnonzero((hi - lo > 1) & (slot >= 0)).tolist():
            # A prefill chunk: every boundary inside it gets its window's Gram.
            req, a, b = self.requests[ids[i]], int(lo[i]), int(hi[i])
            c0 = int(bank.count[req.slot])
            bounds = [t for t in range((c0 // s + 1) * s, c0 + (b - a) + 1, s) if t >= 2]
            self.rows_seen += (b - a) * len(group)
            for t, g, v in bank.extend(req.slot, stack[:, a:b], bounds):  # g: [L, V, V]
                full = g.new_zeros((len(group), w, w))
                full[:, :v, :v] = g
                for li, layer in enumerate(group):
                    self.emit(self._seed(req, layer, step, t, full[li], v, bank, False))

    def finish(self, engine_id: str, step: int) -> None:
        """The request ended: one final frame per layer (its last window), then forget it."""
        req = self.requests.pop(engine_id, None)
        if req is None:
            return
        del self.slot_of[engine_id]
        seeds = []
        for group, bank in self.banks.items():
            n = bank.rows_in(req.slot)
            if n >= 2:
                grams, valid = bank.window_gram([req.slot])
                seeds += [self._seed(req, layer, step, n, grams[li, 0], valid[0], bank, True)
                          for li, layer in enumerate(group)]
            bank.reset(req.slot)
        for seed in sorted(seeds, key=lambda sd: sd.layer):
            self.emit(seed)
        self.slots.release(req.slot)

    def drop(self, engine_id: str) -> None:
        """Forget a request without frames (preempted: it is recomputed from scratch)."""
        req = self.requests.pop(engine_id, None)
        if req is not None:
            del self.slot_of[engine_id]
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


def hidden_values(seeds: list[FrameSeed]) -> list[tuple | None]:
    """The seeds' hidden-state statistics (hooks/hidden.py), computed here, on the
    exporter's thread, all of them at once; None for a seed that has none or whose
    statistics cannot be computed (logged: a bad number costs its own statistics,
    never the frame or another request's)."""
    have = [s for s in seeds if s.hidden is not None]
    if not have:
        return [None] * len(seeds)
    try:
        got = dict(zip(map(id, have), part_values([s.hidden for s in have])))
    except Exception:  # find the one that failed: each alone
        got = {}
        for s in have:
            try:
                got[id(s)] = s.hidden.values()
            except Exception:
                log.debug("eigenwatch: hidden-state statistics of %s failed", s.request_id, exc_info=True)
    return [got.get(id(s)) for s in seeds]


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
        eigs, row_sq, ok = spectra_np(grams, valid, scale, centred=True)
    else:
        grams = torch.zeros((len(seeds), w, w), dtype=torch.float32, device=seeds[0].gram.device)
        for i, s in enumerate(seeds):
            n = s.gram.shape[0]
            grams[i, :n, :n] = s.gram
        eigs, row_sq, ok = spectra(grams, torch.from_numpy(valid).to(grams.device),
                                   torch.from_numpy(scale).to(grams.device))
        eigs, row_sq, ok = eigs.double().cpu().numpy(), row_sq.double().cpu().numpy(), ok.cpu().numpy()
    dims = np.array([s.dim for s in seeds], dtype=np.int64)
    desc, why = describe_windows(eigs, row_sq, ok, valid, dims)
    hidden = hidden_values(seeds)
    frames = []
    for i, s in enumerate(seeds):
        if why[i] is None:
            frames.append(Frame(
                request_id=s.request_id, engine_request_id=s.engine_request_id, model=model, layer=s.layer,
                step=s.step, token_count=s.token_count, skipped_tokens=s.skipped_tokens, window=s.valid,
                dim=s.dim, eigenvalues=eigs[i, : s.valid].astype(np.float32), descriptors=desc[i], final=s.final,
                signature=s.signature, hidden=hidden[i],
            ))
    return frames, [(seeds[i], why[i]) for i in range(len(seeds)) if why[i] is not None]
