"""Per-layer window state for many requests at once: per step, one batched
copy of the new rows into a ring (torch; CPU or GPU); at stride boundaries,
one batched centred Gram for every window due. And the slot allocator shared
by every layer.

One `WindowBank` holds, for S slots (one per monitored request) and L layers
of the same width:

    ring  [L, S, W, k]  the last W rows of each slot, row t at position t % W,
                        as given (or randomly projected to k dims)

A decode step writes one row per slot and layer in one `index_copy_`, O(k)
per row: nothing else moves while the model serves. Spectra are needed only
every `stride` tokens; then `window_gram` gathers the due windows, centres
their rows and takes all their Grams in one batched matmul. Measured against
the incremental update this replaces (a new Gram row per token, O(W·k), plus
the rebases its fp32 state needed): 64 slots × 3 layers, W 32, k 256,
stride 16, one CPU thread: 0.05 ms per step for the copy plus 1.7–2.5 ms per
boundary, against 0.5 ms per step (bench/bench_spectra.py measures both
ways of getting a window's spectrum).

Why centre the rows before the product: hidden states carry a large common
mean, and a request's first row (BOS) is often far from every other (massive
activations). A Gram of raw rows would subtract the mean afterwards and lose
the window's small spread to fp32 cancellation; rows centred first lose
nothing beyond their own rounding. They are first taken relative to one row
of the window, so a window of equal rows gives exactly zero.

Optional random projection to k < d dims (a fixed Gaussian per layer, entries
N(0, 1/k), seeded by the layer index so every tap of a model uses the same
one): inner products are preserved in expectation, the noise spectrum of
Gram/d becomes MP with γ = (W−1)/k in the original σ² units, so layers of
different width are comparable at one fixed aspect ratio (FARMS-style).

Slots come from one `Slots` allocator per tap (a request has the same slot in
every layer's bank): requests join and leave without moving the others'
state; a bank's capacity doubles when a slot past it is first used.
"""

from __future__ import annotations

import numpy as np
import torch


class Slots:
    """Slot numbers 0..max_slots−1 for the requests being tracked; the lowest
    free numbers first, so banks stay small while traffic is light."""

    def __init__(self, max_slots: int):
        if max_slots < 1:
            raise ValueError(f"max_slots: must be >= 1, got {max_slots}")
        self.max_slots = max_slots
        self._free = list(range(max_slots - 1, -1, -1))  # popped from the end: 0 first

    def alloc(self) -> int | None:
        """A free slot, or None when all max_slots are in use."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def in_use(self) -> int:
        return self.max_slots - len(self._free)


def host_index(values, device: torch.device) -> torch.Tensor:
    """Host indices (a list or an int64 numpy array) as an int64 tensor on
    `device`, without a host synchronisation on a GPU (pinned memory,
    asynchronous copy)."""
    if isinstance(values, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    else:
        t = torch.tensor(values, dtype=torch.int64)
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def centred_gram(win: torch.Tensor, valid: list[int]) -> torch.Tensor:
    """win [B, W, k] rows, valid [B] rows in use (the leading positions, or all W
    in any order) -> [B, W, W] float32: the Gram of the valid rows centred over
    themselves, zero outside the leading valid block. Rows are taken relative to
    one of them, then centred, then multiplied (see the module doc). Rows past
    `valid` never reach the result (a reused slot's stale rows may hold NaN)."""
    b, w, k = win.shape
    if min(valid) == w:  # every window full (the decode case): three passes over the rows, no masks
        y = win - win[:, -1:]
        y = y - y.mean(dim=1, keepdim=True)
        return y @ y.transpose(1, 2)
    v = host_index(valid, win.device)
    inside = (torch.arange(w, device=win.device) < v[:, None])[:, :, None]  # [B, W, 1]
    y = win - torch.gather(win, 1, (v.clamp(1, w) - 1)[:, None, None].expand(b, 1, k))
    y = torch.where(inside, y, 0.0)  # where, not a product with a 0/1 mask: NaN·0 is NaN
    y = torch.where(inside, y - y.sum(dim=1, keepdim=True) / v.clamp_min(1)[:, None, None], 0.0)
    return y @ y.transpose(1, 2)


class WindowBank:
    """The windows of S slots at one or several layers of the same width.

    layers=None: one layer; rows, windows and Grams have no layer axis, the
    projection is seeded by `seed`. layers=(l0, l1, ...): one entry per layer on
    a leading axis of every tensor ([L, B, d] rows in, [L, B, W, W] Grams out),
    layer li's projection seeded by li (the same as a one-layer bank with
    seed=li), and one batched op per step for all of them: a slot holds the same
    number of rows at every layer.
    """

    def __init__(self, window: int, dim: int, proj_dim: int | None = None, *, layers: tuple[int, ...] | None = None,
                 max_slots: int = 1024, initial_slots: int = 16, device: torch.device | str = "cpu", seed: int = 0):
        if window < 2:
            raise ValueError(f"window: a spectrum needs at least 2 rows, got {window}")
        if dim < 1:
            raise ValueError(f"dim: must be >= 1, got {dim}")
        if proj_dim is not None and not 1 <= proj_dim <= dim:
            raise ValueError(f"proj_dim: must lie in [1, dim={dim}] or be None, got {proj_dim}")
        if max_slots < 1:
            raise ValueError(f"max_slots: must be >= 1, got {max_slots}")
        if layers is not None and (len(layers) < 1 or len(set(layers)) != len(layers)):
            raise ValueError(f"layers: expected distinct layer indices, got {layers!r}")
        self.window, self.dim = window, dim
        self.k = proj_dim or dim
        self.device = torch.device(device)
        self.max_slots = max_slots
        self.single = layers is None
        self.layers = (seed,) if layers is None else tuple(layers)
        self._proj = None
        if proj_dim is not None:
            mats = []
            for s in self.layers:
                g = torch.Generator(device="cpu").manual_seed(s)
                mats.append(torch.randn(dim, proj_dim, generator=g) / proj_dim**0.5)
            self._proj = torch.stack(mats).to(self.device)  # [L, d, k]
        s = min(initial_slots, max_slots)
        self._ring = torch.zeros(len(self.layers), s, window, self.k, device=self.device)  # [L, S, W, k]
        # Rows seen per slot, on the host: they drive the boundaries, and the
        # scheduler tells the host how many rows each request got, so no device
        # value is ever read back. numpy, so a step's bookkeeping is array ops.
        self.count = np.zeros(s, dtype=np.int64)

    # One-layer banks show their tensors without the layer axis.
    def _view(self, t: torch.Tensor | None):
        return t[0] if self.single and t is not None else t

    @property
    def ring(self) -> torch.Tensor:
        return self._view(self._ring)

    @property
    def proj(self) -> torch.Tensor | None:
        return self._view(self._proj)

    # ---- slots -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._ring.shape[1]

    def ensure(self, slot: int) -> None:
        """Make `slot` addressable: capacity doubles until it covers it (a rare copy)."""
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot: expected 0..{self.max_slots - 1} (max_slots), got {slot}")
        if slot >= self.capacity:
            new = self.capacity
            while new <= slot:
                new *= 2
            new = min(new, self.max_slots)
            old = self.capacity
            self._ring = torch.cat([self._ring, self._ring.new_zeros((len(self.layers), new - old,
                                                                      *self._ring.shape[2:]))], dim=1)
            self.count = np.concatenate([self.count, np.zeros(new - old, dtype=np.int64)])

    def reset(self, slot: int) -> None:
        """Forget a slot's rows (its next row starts a new window)."""
        if slot < self.capacity:
            self.count[slot] = 0

    def rows_in(self, slot: int) -> int:
        return int(self.count[slot]) if slot < self.capacity else 0

    # ---- rows ---------------------------------------------------------------------------
    def _layered(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        rows = rows[None] if self.single else rows
        if rows.ndim != 3 or rows.shape[0] != len(self.layers) or rows.shape[-1] != self.dim:
            want = "[B, d]" if self.single else f"[{len(self.layers)}, B, d]"
            raise ValueError(f"rows: expected {want} with d={self.dim}, got shape {tuple(rows.shape)}")
        return rows

    def _store(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [L, B, d] -> [L, B, k] float32 as the ring stores them."""
        x = rows.to(device=self.device, dtype=torch.float32)
        return x if self._proj is None else torch.bmm(x, self._proj)

    def index(self, values: list[int]) -> torch.Tensor:
        return host_index(values, self.device)

    def append(self, slots, rows: torch.Tensor) -> None:
        """One new row for each of B distinct slots (a list or an int64 array), at
        every layer. rows: [B, d] (one-layer bank) or [L, B, d]. One copy into the
        ring for all of them; the indices are array arithmetic, no loop per slot."""
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return
        rows = self._layered(rows, "rows")
        n_layers, s_cap, w, k = len(self.layers), self.capacity, self.window, self.k
        at = slots * w + self.count[slots] % w  # [B] flat ring row of each slot's new row, layer 0
        self.count[slots] += 1  # slots are distinct: no lost increments
        flat = (np.arange(n_layers, dtype=np.int64)[:, None] * (s_cap * w) + at).ravel()  # [L·B]
        self._ring.view(-1, k).index_copy_(0, self.index(flat), self._store(rows).reshape(-1, k))

    def extend(self, slot: int, rows: torch.Tensor, boundaries: list[int] | None = None) -> list[tuple[int, torch.Tensor, int]]:
        """Many rows for one slot (a prefill chunk). rows: [n, d] (one-layer bank)
        or [L, n, d]. Returns, for each requested boundary t (row counts after this
        chunk's t−c0 rows), (t, centred Gram [V, V] or [L, V, V] of the window
        ending at t, V)."""
        rows = self._layered(rows, "rows")
        n = rows.shape[1]
        if n == 0:
            return []
        w, c0 = self.window, int(self.count[slot])
        x = self._store(rows)  # [L, n, k]
        prev = self._ordered(slot)  # [L, min(c0, W), k], oldest first
        out = []
        for t in boundaries or ():
            k_rows = t - c0
            if k_rows >= w:
                win = x[:, k_rows - w: k_rows]
            else:
                win = torch.cat([prev[:, max(0, prev.shape[1] - (w - k_rows)):], x[:, :k_rows]], dim=1)
            v = win.shape[1]
            g = centred_gram(win, [v] * win.shape[0])  # [L, V, V]
            out.append((t, self._view(g), v))
        m = min(n, w)
        c1 = c0 + n
        pos = self.index([p % w for p in range(c1 - m, c1)])
        self._ring[:, slot, pos] = x[:, n - m:]
        self.count[slot] = c1
        return out

    def _ordered(self, slot: int) -> torch.Tensor:
        """[L, min(count, W), k]: the slot's stored rows, oldest first."""
        c, w = int(self.count[slot]), self.window
        m = min(c, w)
        if m == 0:
            return self._ring.new_zeros((len(self.layers), 0, self.k))
        return self._ring[:, slot, self.index([p % w for p in range(c - m, c)])]

    def window_gram(self, slots) -> tuple[torch.Tensor, list[int]]:
        """The current windows' centred Grams [B, W, W] (one-layer bank) or
        [L, B, W, W], one batched product for all, and their valid counts V (the
        Gram's leading V×V block; before a slot has W rows its rows sit at
        positions 0..V−1, after that in ring order, which no spectrum minds)."""
        slots = np.asarray(slots, dtype=np.int64)
        valid = np.minimum(self.count[slots], self.window).tolist()
        n_layers, b, w = len(self.layers), len(slots), self.window
        if b > 0 and bool(np.all(np.diff(slots) == 1)):
            lo = int(slots[0])
            win = self._ring[:, lo:lo + b]  # consecutive slots (the usual case): a view, no copy
        else:
            win = self._ring[:, self.index(slots)]  # [L, B, W, k], a gathered copy
        grams = centred_gram(win.reshape(n_layers * b, w, self.k), valid * n_layers).view(n_layers, b, w, w)
        return self._view(grams), valid
