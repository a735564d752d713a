"""Per tapped layer, one streaming top-direction sketch over the rows a tap captures, cut into windows of
`every` tokens; each finished window leaves as its top directions only.

The sketch is kernels/sketch.py `StackedPower` (the light path of `HeavyLight`: block power steps with
history), one stack for all the layers of a step, so a step costs the same few batched operations
whatever the layer count: one stack of the rows, two [L, n, d]×[L, d, k] products; the power steps
(batched QR) run only at epoch ends (256, 768, 1792, 3840 rows into a window) and at the window's end.
Both taps and `eigenwatch calibrate` use this class, so a live window and a calibration window are the
same estimator over the same number of tokens. Rows never leave it: a `SketchWindow` holds a [d, k] block
product, and `directions()` (called on the exporter thread) turns it into k unit vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eigenwatch.kernels.sketch import StackedPower, leading_directions

DEFAULT_EVERY = 4096  # tokens per window: the angle's sampling noise shrinks like 1/√every
SNAPSHOT_K = 4  # directions per snapshot (the sidecar's angle reads the first)
BLOCK = 8  # power block width k (the snapshot's directions are its leading Ritz vectors)
EPOCH0 = 256  # rows in a window's first power epoch (doubling after)


@dataclass
class SketchWindow:
    """One finished window of one layer: its block product, handed over (nothing else touches it)."""

    layer: int
    tokens_seen: int  # tokens of this layer the tap saw since it started, up to the window's end
    window_tokens: int  # tokens in this window (== `every`)
    rows: int  # rows fed to the sketch (window_tokens / sample, rounded)
    light: object  # [d, k] block product Σ a aᵀ V of the window (numpy or a device tensor)

    def directions(self, k: int = SNAPSHOT_K) -> np.ndarray:
        """[k, d] float32 unit rows, leading first (sign arbitrary). Reads a device product back, so call it
        off the engine thread (the exporter's). Raises SketchFailure when the window had no usable rows."""
        w = self.light
        w = w.detach().cpu().numpy() if hasattr(w, "detach") else np.asarray(w)
        u = leading_directions(w.astype(np.float64), min(k, w.shape[1]))  # [d, k]
        return np.ascontiguousarray(u.T, dtype=np.float32)


class _Group:
    """Layers whose rows arrive together: one StackedPower, one set of window counters."""

    __slots__ = ("layers", "power", "seen", "window", "fed", "windows")

    def __init__(self, layers: tuple[int, ...]):
        self.layers = layers
        self.power: StackedPower | None = None
        self.seen = 0  # tokens since start (per layer)
        self.window = 0  # tokens in the current window
        self.fed = 0  # rows fed to the current window
        self.windows = 0


class LayerSketches:
    """Windows of `every` tokens per layer; `add_step` returns the windows that finished in that step.

    sample = s keeps one row in s (rows whose index since start is a multiple of s: a strided view, no
    copy), for the overhead budget; windows are still counted in tokens. A new window starts its power
    iteration from the last window's basis (a warm start: the fixed point is still the new window's own
    top direction, reached in fewer steps). Layers that come in the same step share one stack; a step
    with another set of layers splits the stack into one per layer (a tap sends the same set every step).
    """

    def __init__(self, every: int = DEFAULT_EVERY, sample: int = 1, seed: int = 0):
        for name, v, lo in (("every", every, 2), ("sample", sample, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if sample > every:  # every window must keep at least one row
            raise ValueError(f"sample: expected an integer in [1, every={every}], got {sample}")
        self.every, self.sample, self.seed = every, sample, seed
        self.layers: dict[int, _Group] = {}

    def add_step(self, rows: dict, items: list[tuple[str, int, int]] | None = None) -> list[SketchWindow]:
        """rows: {layer: [N, d] fp32 tensor or array, same N}; items: the (request, lo, hi) spans to keep
        (tracked requests; None: every row). Returns the windows this step finished."""
        out: list[SketchWindow] = []
        for group in self._groups(tuple(rows)):
            xs = [rows[layer] for layer in group.layers]
            if hasattr(xs[0], "detach") and not isinstance(xs[0], np.ndarray):
                import torch

                x = xs[0][None] if len(xs) == 1 else torch.stack(xs)
            else:
                x = np.stack([np.asarray(a) for a in xs])
            if items is not None:
                x = _keep(x, items)
            if x.shape[1]:
                out.extend(self._add(group, x))
        return out

    def _groups(self, layers: tuple[int, ...]) -> list[_Group]:
        key = tuple(sorted(layers))
        groups = {id(self.layers[l]): self.layers[l] for l in key if l in self.layers}
        if len(groups) == 1 and next(iter(groups.values())).layers == key:
            return list(groups.values())  # the usual case: the same layers as every step
        for g in groups.values():
            if g.layers != key:
                self._split(g)
        new = [l for l in key if l not in self.layers]
        if new and len(new) == len(key):
            g = _Group(key)
            for l in key:
                self.layers[l] = g
        else:
            for l in new:
                self.layers[l] = _Group((l,))
        return list({id(self.layers[l]): self.layers[l] for l in key}.values())

    def _split(self, g: _Group) -> None:
        for i, l in enumerate(g.layers):
            one = _Group((l,))
            one.seen, one.window, one.fed, one.windows = g.seen, g.window, g.fed, g.windows
            if g.power is not None:
                p = g.power
                q = StackedPower(1, p.dim, p.block, p.epoch0, p.dtype, seeds=[0], device=p.xp.device)
                q.basis_t, q.acc_t, q.hist_t = p.basis_t[i:i + 1], p.acc_t[i:i + 1], p.hist_t[i:i + 1]
                q.rows, q.epoch_start, q.epoch_len, q.epochs = p.rows, p.epoch_start, p.epoch_len, p.epochs
                q.nonfinite = p.nonfinite[i:i + 1]
                one.power = q
            self.layers[l] = one

    def _add(self, g: _Group, x) -> list[SketchWindow]:
        done = []
        while x.shape[1]:
            room = self.every - g.window
            part, x = x[:, :room], x[:, room:]
            off = (-g.seen) % self.sample  # global row index ≡ 0 (mod sample): no bias to a batch position
            kept = part[:, off::self.sample] if self.sample > 1 else part
            g.seen += part.shape[1]
            g.window += part.shape[1]
            if kept.shape[1]:
                if g.power is None:
                    g.power = self._new_power(g, kept)
                g.power.update(kept)
                g.fed += kept.shape[1]
            if g.window == self.every:
                done.extend(self._close(g))
        return done

    def _new_power(self, g: _Group, x) -> StackedPower:
        device = x.device if hasattr(x, "device") and not isinstance(x, np.ndarray) else None
        seeds = [self.seed + 7919 * layer for layer in g.layers]
        return StackedPower(len(g.layers), int(x.shape[2]), BLOCK, EPOCH0, "float32", seeds=seeds, device=device)

    def _close(self, g: _Group) -> list[SketchWindow]:
        w = g.power.finish()  # a new array: the exporter thread reads its slices later
        out = [SketchWindow(layer, g.seen, g.window, g.fed, w[i]) for i, layer in enumerate(g.layers)]
        g.window, g.fed = 0, 0
        g.windows += 1
        return out

    def stats(self) -> dict:
        return {"every": self.every, "sample": self.sample,
                "windows": {l: s.windows for l, s in sorted(self.layers.items())}}


def _keep(x, items):
    """x: [L, N, d] -> the rows of the tracked spans along N (a view when they are one span from row 0)."""
    spans: list[list[int]] = []
    for lo, hi in sorted((lo, hi) for _, lo, hi in items if hi > lo):
        if spans and lo <= spans[-1][1]:  # adjacent requests' rows: one span (a view, not a gather)
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    if len(spans) == 1 and spans[0][0] == 0:
        return x[:, :spans[0][1]]
    idx = np.concatenate([np.arange(lo, hi) for lo, hi in spans]) if spans else np.zeros(0, np.int64)
    if hasattr(x, "device") and not isinstance(x, np.ndarray):
        import torch

        return x.index_select(1, torch.as_tensor(idx, dtype=torch.int64).to(x.device))
    return x[:, idx]
