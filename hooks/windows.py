"""Per-request sliding windows of hidden rows -> frames (engine-agnostic).

Frames are emitted when a request's row count crosses a multiple of `stride`
(the window is the W rows ending exactly there) and once at the end. So the
frames of a request do not depend on how the engine chunked or batched it:
the vLLM tap and the HF tap see the same frames for the same text.

The hot path (inside the host's forward) only copies rows; eigenvalues are
computed later by `finalize` (the exporter thread for vLLM, inline for HF).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES, describe
from eigenwatch.kernels.spectra import window_spectrum

# vLLM appends "-" + 8 hex chars to the client's request id (input_processor).
_ENGINE_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def external_request_id(engine_request_id: str) -> str:
    return _ENGINE_SUFFIX.sub("", engine_request_id)


@dataclass
class FrameSeed:
    """A window copied out of the forward pass, waiting for its spectrum:
    either its rows, or (batched path) the raw Gram of its stored rows."""

    request_id: str
    engine_request_id: str
    layer: int
    step: int
    token_count: int
    skipped_tokens: int
    rows: torch.Tensor | None  # [W', d] float32, W' <= W, a private copy
    final: bool
    gram: torch.Tensor | None = None  # [W, W] raw inner products (batched path)
    valid: int = 0  # rows of `gram` in use
    dim: int = 0  # MP n for the gram: d, or the projected k
    scale: float = 1.0  # eigenvalues of centred gram * scale (1/d)


@dataclass
class Frame:
    request_id: str
    engine_request_id: str
    model: str
    layer: int
    step: int
    token_count: int
    skipped_tokens: int
    window: int
    dim: int
    eigenvalues: np.ndarray  # [W] descending
    descriptors: np.ndarray  # [len(DESCRIPTOR_NAMES)]
    final: bool

    def descriptor(self, name: str) -> float:
        return float(self.descriptors[DESCRIPTOR_NAMES.index(name)])


def seed_spectra(seeds: list[FrameSeed]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """(eigenvalues, row_sq_norms) for many seeds, None for a seed whose window
    holds NaN/Inf. Gram seeds of one shape go through one batched eigensolve."""
    from eigenwatch.kernels.incremental import centre_gram

    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(seeds)
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(seeds):
        if s.gram is None:
            try:
                out[i] = window_spectrum(s.rows)
            except ValueError:  # NaN/Inf rows: finalize() says why
                out[i] = None
        else:
            groups.setdefault((tuple(s.gram.shape), s.valid), []).append(i)
    for (_, valid), idx in groups.items():
        grams = torch.stack([seeds[i].gram for i in idx])  # [B, W, W]
        scale = torch.tensor([seeds[i].scale for i in idx], dtype=torch.float64)[:, None, None]
        c = (centre_gram(grams, valid)[:, :valid, :valid] * scale).cpu()  # [B, V, V] = Xc Xcᵀ / d
        ok = torch.isfinite(c).flatten(1).all(1)
        eigs = torch.zeros(c.shape[:2], dtype=torch.float64)
        if bool(ok.any()):
            eigs[ok] = torch.linalg.eigvalsh(c[ok]).flip(-1).clamp_min(0.0)
        diag = torch.diagonal(c, dim1=1, dim2=2)
        for j, i in enumerate(idx):
            out[i] = (eigs[j], diag[j].clone()) if bool(ok[j]) else None
    return out


def seed_eigenvalues(seeds: list[FrameSeed]) -> list[torch.Tensor | None]:
    return [None if sp is None else sp[0] for sp in seed_spectra(seeds)]


def finalize(seed: FrameSeed, model: str, spectrum: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None) -> Frame:
    """Spectrum and descriptors of a seed. Raises ValueError on bad windows.
    `spectrum`: what seed_spectra() computed for it, if the caller batched that."""
    if seed.gram is None:
        w, d = seed.rows.shape
    else:
        w, d = seed.valid, seed.dim
    if spectrum is None:
        spectrum = window_spectrum(seed.rows) if seed.gram is None else seed_spectra([seed])[0]
        if spectrum is None:
            raise ValueError("window: contains NaN or Inf activations")
    if isinstance(spectrum, torch.Tensor):  # eigenvalues only
        eigs, row_sq = spectrum, None
    else:
        eigs, row_sq = spectrum
    desc = describe(eigs.numpy(), w, d, row_sq_norms=None if row_sq is None else row_sq.numpy())
    return Frame(
        request_id=seed.request_id,
        engine_request_id=seed.engine_request_id,
        model=model,
        layer=seed.layer,
        step=seed.step,
        token_count=seed.token_count,
        skipped_tokens=seed.skipped_tokens,
        window=w,
        dim=d,
        eigenvalues=eigs.numpy().astype(np.float32),
        descriptors=desc,
        final=seed.final,
    )


class _Track:
    """A ring of the last W rows of one request at one layer: a decode step
    writes one row in place (O(d)); windows are assembled only at boundaries."""

    __slots__ = ("buf", "count")

    def __init__(self):
        self.buf: torch.Tensor | None = None  # [W, d] float32, row t at t % W
        self.count = 0  # rows seen

    def last(self, m: int) -> torch.Tensor:
        """The last min(m, count, W) rows, oldest first."""
        w = self.buf.shape[0]
        m = min(m, self.count, w)
        start = self.count - m
        lo, hi = start % w, self.count % w
        if m == 0:
            return self.buf[:0]
        if lo < hi:
            return self.buf[lo:hi]
        return torch.cat([self.buf[lo:], self.buf[:hi]])

    def push(self, rows: torch.Tensor) -> None:
        """rows: [n, d] float32, appended after the rows seen so far."""
        n, d = rows.shape
        w = self.buf.shape[0]
        if n >= w:
            rows, start = rows[-w:], self.count + n - w
        else:
            start = self.count
        m = rows.shape[0]
        lo = start % w
        first = min(m, w - lo)
        self.buf[lo : lo + first].copy_(rows[:first])
        if first < m:
            self.buf[: m - first].copy_(rows[first:])
        self.count += n


class _Request:
    __slots__ = ("engine_id", "external_id", "skipped", "tracks")

    def __init__(self, engine_id: str, skipped: int, external_id: str):
        self.engine_id = engine_id
        self.external_id = external_id
        self.skipped = skipped
        self.tracks: dict[int, _Track] = {}


class WindowTap:
    """Windows for many requests × layers. Not thread-safe: call it from the
    engine thread only. `emit` receives FrameSeeds."""

    def __init__(self, window: int, stride: int, max_requests: int, emit: Callable[[FrameSeed], None]):
        if window < 2:
            raise ValueError(f"window: a spectrum needs at least 2 rows, got {window}")
        if stride < 1:
            raise ValueError(f"stride: must be >= 1, got {stride}")
        self.window = window
        self.stride = stride
        self.max_requests = max_requests
        self.emit = emit
        self.requests: dict[str, _Request] = {}
        self.untracked = 0
        self.rows_seen = 0

    def begin(self, engine_id: str, skipped_tokens: int = 0, external_id: str | None = None) -> bool:
        """Start tracking a request; False (and counted) when at the limit."""
        if engine_id in self.requests:
            return True
        if len(self.requests) >= self.max_requests:
            self.untracked += 1
            return False
        self.requests[engine_id] = _Request(engine_id, skipped_tokens, external_id or engine_id)
        return True

    def tracked(self, engine_id: str) -> bool:
        return engine_id in self.requests

    def add_rows(self, engine_id: str, layer: int, rows: torch.Tensor, step: int) -> None:
        """rows: [n, d] of this request at this layer, in token order."""
        req = self.requests.get(engine_id)
        if req is None or rows.shape[0] == 0:
            return
        track = req.tracks.get(layer)
        if track is None:
            track = req.tracks[layer] = _Track()
        n = rows.shape[0]
        w, s = self.window, self.stride
        self.rows_seen += n
        rows = rows.detach()
        if rows.dtype != torch.float32:
            rows = rows.float()
        if track.buf is None:
            track.buf = torch.empty(w, rows.shape[1], dtype=torch.float32, device=rows.device)
        c0 = track.count
        first = (c0 // s + 1) * s
        for t in range(first, c0 + n + 1, s):
            k = t - c0  # rows of this chunk up to boundary t
            if k >= w:
                win = rows[k - w : k]
            else:
                win = torch.cat([track.last(w - k), rows[:k]])
            if win.shape[0] >= 2:
                self.emit(self._seed(req, layer, step, t, win, final=False))
        track.push(rows)

    def finish(self, engine_id: str, step: int) -> None:
        """The request ended: one final frame per layer, then forget it."""
        req = self.requests.pop(engine_id, None)
        if req is None:
            return
        for layer, track in sorted(req.tracks.items()):
            if track.count >= 2:
                self.emit(self._seed(req, layer, step, track.count, track.last(self.window), final=True))

    def drop(self, engine_id: str) -> None:
        self.requests.pop(engine_id, None)

    def _seed(self, req: _Request, layer: int, step: int, count: int, win: torch.Tensor, final: bool) -> FrameSeed:
        return FrameSeed(
            request_id=req.external_id,
            engine_request_id=req.engine_id,
            layer=layer,
            step=step,
            token_count=count,
            skipped_tokens=req.skipped,
            rows=win.detach().to(dtype=torch.float32, copy=True),
            final=final,
        )


class _BatchedRequest:
    __slots__ = ("engine_id", "external_id", "skipped", "slot")

    def __init__(self, engine_id: str, skipped: int, external_id: str, slot: int):
        self.engine_id, self.external_id, self.skipped, self.slot = engine_id, external_id, skipped, slot


class BatchedWindowTap:
    """The same windows and frames as `WindowTap`, for all requests of a step
    at once: one `WindowBank` per layer, a decode step is one batched update
    per layer (no per-request tensor work), and frames carry the window's Gram
    (W×W) instead of its rows. Not thread-safe: engine thread only."""

    def __init__(self, window: int, stride: int, max_requests: int, emit: Callable[[FrameSeed], None],
                 proj_dim: int | None = None):
        if window < 2:
            raise ValueError(f"window: a spectrum needs at least 2 rows, got {window}")
        if stride < 1:
            raise ValueError(f"stride: must be >= 1, got {stride}")
        self.window, self.stride, self.max_requests = window, stride, max_requests
        self.emit = emit
        self.proj_dim = proj_dim
        self.banks: dict[int, "WindowBank"] = {}
        self.requests: dict[str, _BatchedRequest] = {}
        self._free = list(range(max_requests - 1, -1, -1))
        self.untracked = 0
        self.rows_seen = 0

    def begin(self, engine_id: str, skipped_tokens: int = 0, external_id: str | None = None) -> bool:
        if engine_id in self.requests:
            return True
        if not self._free:
            self.untracked += 1
            return False
        slot = self._free.pop()
        for bank in self.banks.values():
            bank.ensure(slot)
            bank.reset(slot)
        self.requests[engine_id] = _BatchedRequest(engine_id, skipped_tokens, external_id or engine_id, slot)
        return True

    def tracked(self, engine_id: str) -> bool:
        return engine_id in self.requests

    def _bank(self, layer: int, rows: torch.Tensor):
        bank = self.banks.get(layer)
        if bank is None:
            from eigenwatch.kernels.incremental import WindowBank

            proj = self.proj_dim if self.proj_dim and self.proj_dim < rows.shape[1] else None
            bank = self.banks[layer] = WindowBank(self.window, rows.shape[1], proj, max_slots=self.max_requests,
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
            req = self.requests[r]
            c0 = bank.count[req.slot]
            bounds = [t for t in range((c0 // s + 1) * s, c0 + (hi - lo) + 1, s) if t >= 2]
            self.rows_seen += hi - lo
            for t, g, v in bank.extend(req.slot, stream[lo:hi], bounds):
                full = g.new_zeros((w, w))
                full[:v, :v] = g
                self.emit(self._seed(req, layer, step, t, full, v, bank, False))

    def finish(self, engine_id: str, step: int) -> None:
        req = self.requests.pop(engine_id, None)
        if req is None:
            return
        for layer, bank in sorted(self.banks.items()):
            n = bank.count[req.slot] if req.slot < bank.capacity else 0
            if n >= 2:
                grams, valid = bank.window_gram([req.slot])
                self.emit(self._seed(req, layer, step, n, grams[0], valid[0], bank, True))
            bank.reset(req.slot)
        self._free.append(req.slot)

    def drop(self, engine_id: str) -> None:
        req = self.requests.pop(engine_id, None)
        if req is not None:
            for bank in self.banks.values():
                bank.reset(req.slot)
            self._free.append(req.slot)

    def _seed(self, req, layer, step, count, gram, valid, bank, final) -> FrameSeed:
        return FrameSeed(
            request_id=req.external_id, engine_request_id=req.engine_id, layer=layer, step=step,
            token_count=count, skipped_tokens=req.skipped, rows=None, final=final,
            gram=gram.detach().to(dtype=torch.float32), valid=valid, dim=bank.k, scale=1.0 / bank.dim,
        )
