"""Per tapped layer, one streaming top-direction sketch (kernels/sketch.py `HeavyLight`) over the rows a
tap captures, cut into windows of `every` tokens; each finished window leaves as its top directions only.

Both taps and `eigenwatch calibrate` use this class, so a live window and a calibration window are the
same estimator over the same number of tokens. Rows never leave it: a `SketchWindow` holds a sketch, and
`directions()` (called on the exporter thread) turns it into k unit vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eigenwatch.kernels.sketch import HeavyLight, HeavyLightConfig

DEFAULT_EVERY = 4096  # tokens per window: the angle's sampling noise shrinks like 1/√every
SNAPSHOT_K = 4  # directions per snapshot (the sidecar's angle reads the first)
BATCH_ROWS = 256  # rows buffered on the device before one sketch update (launches amortised over steps)


@dataclass
class SketchWindow:
    """One finished window of one layer: its sketch, handed over (nothing else touches it afterwards)."""

    layer: int
    tokens_seen: int  # tokens of this layer the tap saw since it started, up to the window's end
    window_tokens: int  # tokens in this window (== `every`)
    rows: int  # rows fed to the sketch (window_tokens / sample, rounded)
    sketch: HeavyLight

    def directions(self, k: int = SNAPSHOT_K) -> np.ndarray:
        """[k, d] float32 unit rows, leading first (sign arbitrary). On CUDA the estimate reads the device
        back (a [k, k] eigh), so call it off the engine thread (the exporter's)."""
        k = min(k, self.sketch.config.block)
        u = self.sketch.estimate(k)  # [d, k]
        u = u.detach().cpu().numpy() if hasattr(u, "detach") else np.asarray(u)
        return np.ascontiguousarray(u.T, dtype=np.float32)


def window_config(dim: int, every: int, seed: int = 0) -> HeavyLightConfig:
    """The sketch of one window: short epochs (256, 512, ... rows) so a window of a few thousand rows gets
    several power steps; a shuffle buffer of at most every/4 rows (token runs of one request look random
    to the power steps, and the buffered rows still enter the estimate exactly)."""
    return HeavyLightConfig(dim=dim, block=8, shuffle=max(0, min(1024, every // 4)), heavy_capacity=64,
                            epoch0=256, dtype="float32", seed=seed)


class _Layer:
    __slots__ = ("sketch", "buf", "filled", "seen", "window", "fed", "windows", "basis")

    def __init__(self):
        self.sketch = None
        self.buf = None  # [BATCH_ROWS, d] on the rows' device
        self.filled = 0
        self.seen = 0  # tokens since start
        self.window = 0  # tokens in the current window
        self.fed = 0  # rows fed to the current window's sketch
        self.windows = 0
        self.basis = None  # the last window's power basis: the next window starts from it


class LayerSketches:
    """Windows of `every` tokens per layer; `add_step` returns the windows that finished in that step.

    sample = s keeps one row in s (rows whose index since start is a multiple of s), for the overhead budget;
    windows are still counted in tokens. A new window starts its power iteration from the last window's
    basis (a warm start: the fixed point is still the new window's own top direction, reached in fewer steps).
    """

    def __init__(self, every: int = DEFAULT_EVERY, sample: int = 1, batch: int = BATCH_ROWS, seed: int = 0):
        for name, v, lo in (("every", every, 2), ("sample", sample, 1), ("batch", batch, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if sample > every:  # every window must keep at least one row
            raise ValueError(f"sample: expected an integer in [1, every={every}], got {sample}")
        self.every, self.sample, self.batch, self.seed = every, sample, batch, seed
        self.layers: dict[int, _Layer] = {}

    def add_step(self, rows: dict, items: list[tuple[str, int, int]] | None = None) -> list[SketchWindow]:
        """rows: {layer: [N, d] fp32 tensor or array}; items: the (request, lo, hi) spans to keep (tracked
        requests; None: every row). Returns the windows this step finished."""
        out: list[SketchWindow] = []
        index = None
        for layer, x in rows.items():
            if items is not None:
                x, index = _keep(x, items, index)
            if x.shape[0]:
                out.extend(self._add(layer, x))
        return out

    def _add(self, layer: int, x) -> list[SketchWindow]:
        st = self.layers.get(layer)
        if st is None:
            st = self.layers[layer] = _Layer()
        done = []
        while x.shape[0]:
            room = self.every - st.window
            part, x = x[:room], x[room:]
            off = (-st.seen) % self.sample  # global row index ≡ 0 (mod sample): no bias to a batch position
            kept = part[off::self.sample] if self.sample > 1 else part
            st.seen += part.shape[0]
            st.window += part.shape[0]
            if kept.shape[0]:
                self._feed(layer, st, kept)
            if st.window == self.every:
                done.append(self._close(layer, st))
        return done

    def _feed(self, layer: int, st: _Layer, x) -> None:
        # x: [n, d]; copied into the device buffer, one sketch update per `batch` rows
        if st.sketch is None:
            st.sketch = self._new_sketch(layer, st, x)
        while x.shape[0]:
            take = min(self.batch - st.filled, x.shape[0])
            st.buf[st.filled:st.filled + take] = x[:take]
            st.filled += take
            st.fed += take
            x = x[take:]
            if st.filled == self.batch:
                st.sketch.update(st.buf)
                st.filled = 0

    def _new_sketch(self, layer: int, st: _Layer, x) -> HeavyLight:
        d = int(x.shape[1])
        cfg = window_config(d, self.every, seed=self.seed + 7919 * layer + st.windows)
        if hasattr(x, "device") and not isinstance(x, np.ndarray):
            import torch

            sk = HeavyLight(config=cfg, device=x.device)
            if st.buf is None or st.buf.shape[1] != d:
                st.buf = torch.empty((self.batch, d), dtype=torch.float32, device=x.device)
        else:
            sk = HeavyLight(config=cfg)
            if st.buf is None or st.buf.shape[1] != d:
                st.buf = np.empty((self.batch, d), dtype=np.float32)
        if st.basis is not None and tuple(st.basis.shape) == tuple(sk.basis.shape):
            sk.basis = st.basis
        return sk

    def _close(self, layer: int, st: _Layer) -> SketchWindow:
        if st.filled:
            st.sketch.update(st.buf[:st.filled])
            st.filled = 0
        sk = st.sketch
        win = SketchWindow(layer, st.seen, st.window, st.fed, sk)
        # The next window starts from this one's basis (a copy: the exporter thread reads `sk` later).
        st.basis = sk.basis.clone() if hasattr(sk.basis, "clone") else sk.basis.copy()
        st.sketch, st.window, st.fed = None, 0, 0
        st.windows += 1
        return win

    def stats(self) -> dict:
        return {"every": self.every, "sample": self.sample,
                "windows": {l: s.windows for l, s in sorted(self.layers.items())}}


def _keep(x, items, index):
    """x: [N, d] -> the rows of the tracked spans (no copy when they are one span from row 0)."""
    spans = [(lo, hi) for _, lo, hi in items if hi > lo]
    if len(spans) == 1 and spans[0][0] == 0:
        return x[:spans[0][1]], index
    if index is None:  # one index for every layer of the step
        idx = np.concatenate([np.arange(lo, hi) for lo, hi in spans]) if spans else np.zeros(0, np.int64)
        if hasattr(x, "device") and not isinstance(x, np.ndarray):
            import torch

            index = torch.as_tensor(idx, dtype=torch.int64).to(x.device)
        else:
            index = idx
    return x[index], index

