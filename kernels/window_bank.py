"""Per-layer window state for many requests at once, updated in one batched op
per step (torch; CPU or GPU), and the slot allocator shared by every layer.

One `WindowBank` per tapped layer holds, for S slots (one per monitored request):

    ring  [S, W, k]  the last W rows, row t of a slot at position t % W, stored as
                     (x − ref) P − shift (P: the projection, or the identity)
    gram  [S, W, W]  raw inner products of the stored ring rows (not centred)
    ref   [S, d]     a recent raw row of the slot
    shift [S, k]     what makes the stored rows of the window about mean-zero

A decode step appends one row to each of B slots in one batched update: write
the row, one new row of dot products against the W ring rows, O(W·k) per
token, never a full O(W²·k) recompute. Eigenvalues are needed only every
`stride` tokens; kernels/gram.py gets them from the Gram without touching the
rows again.

Why ref and shift: hidden states carry a large common mean, and the first row
of a request (BOS) is often far from every other (massive activations). The
centred Gram subtracts the window's mean from raw inner products, so an fp32
Gram of rows far from their own mean loses the window's small spread to
cancellation (a prompt of one repeated word lost it entirely). Subtracting a
constant changes no centred quantity, so a slot is rebased after every prefill
chunk, when decode rows push its first row out of the window, and every
REBASE_EVERY windows after: ref becomes the newest raw row, shift the window's
mean relative to it, and the ring and Gram are recomputed from the re-centred
rows (O(W²·k) for each slot due).

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

import torch

from . import backend

REBASE_EVERY = 8  # decode rows: windows between rebases once the first has filled


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
        n_layers = len(self.layers)
        self._proj = None
        if proj_dim is not None:
            mats = []
            for s in self.layers:
                g = torch.Generator(device="cpu").manual_seed(s)
                mats.append(torch.randn(dim, proj_dim, generator=g) / proj_dim**0.5)
            self._proj = torch.stack(mats).to(self.device)  # [L, d, k]
        s = min(initial_slots, max_slots)
        self._ring = torch.zeros(n_layers, s, window, self.k, device=self.device)  # [L, S, W, k]
        self._gram = torch.zeros(n_layers, s, window, window, device=self.device)  # [L, S, W, W]
        self._ref = torch.zeros(n_layers, s, dim, device=self.device)  # [L, S, d]
        self._shift = torch.zeros(n_layers, s, self.k, device=self.device)  # [L, S, k]
        self.count = [0] * s  # rows seen per slot (host-side: drives boundaries)
        self.triton = backend.use_triton(self.device)

    # One-layer banks show their tensors without the layer axis.
    def _view(self, t: torch.Tensor | None):
        return t[0] if self.single and t is not None else t

    @property
    def ring(self) -> torch.Tensor:
        return self._view(self._ring)

    @property
    def gram(self) -> torch.Tensor:
        return self._view(self._gram)

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
            self._grow(min(new, self.max_slots))

    def reset(self, slot: int) -> None:
        """Forget a slot's rows (its next row starts a new window)."""
        if slot < self.capacity:
            self.count[slot] = 0

    def rows_in(self, slot: int) -> int:
        return self.count[slot] if slot < self.capacity else 0

    def _grow(self, new: int) -> None:
        old = self.capacity
        grow = lambda t: torch.cat([t, t.new_zeros((t.shape[0], new - old, *t.shape[2:]))], dim=1)
        self._ring, self._gram = grow(self._ring), grow(self._gram)
        self._ref, self._shift = grow(self._ref), grow(self._shift)
        self.count += [0] * (new - old)

    # ---- rows ---------------------------------------------------------------------------
    def _layered(self, rows: torch.Tensor, name: str, n_dims: int) -> torch.Tensor:
        rows = rows[None] if self.single else rows
        if rows.ndim != n_dims + 1 or rows.shape[0] != len(self.layers) or rows.shape[-1] != self.dim:
            want = ("[n, d]" if n_dims == 2 else "[B, d]") if self.single else f"[{len(self.layers)}, B, d]"
            raise ValueError(f"{name}: expected {want} with d={self.dim}, got shape {tuple(rows.shape)}")
        return rows

    def _store(self, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """rows [L, B, d] raw -> [L, B, k] as the slots store them."""
        x = rows.to(device=self.device, dtype=torch.float32) - self._ref[:, slots]
        x = x if self._proj is None else torch.bmm(x, self._proj)
        return x - self._shift[:, slots]

    def _start(self, idx: torch.Tensor, first: torch.Tensor) -> None:
        """Fresh slots idx [B] take their first raw row [L, B, d] as the reference."""
        self._ref[:, idx] = first.to(device=self.device, dtype=torch.float32)
        self._shift[:, idx] = 0.0

    def _rebase_due(self, count: int) -> bool:
        # When the request's first row has just left the window (the mean no longer
        # counts it), then every REBASE_EVERY windows: hidden states drift slowly,
        # and a rebase costs a whole Gram (O(W²·k)) for every slot due.
        w = self.window
        return count == w + 1 or count % (REBASE_EVERY * w) == 0

    def _rebase(self, idx: torch.Tensor, last_raw: torch.Tensor, last_stored: torch.Tensor) -> None:
        """Slots idx [B] whose W ring rows are all valid: re-centre them. last_raw [L, B, d]
        and last_stored [L, B, k]: the newest row, raw and as stored before the rebase."""
        ring = self._ring[:, idx]  # [L, B, W, k]
        mu = ring.mean(dim=2)  # [L, B, k]
        ring = ring - mu[:, :, None, :]
        self._ring[:, idx] = ring
        self._gram[:, idx] = ring @ ring.transpose(-1, -2)
        # stored(x) = (x − ref)P − shift keeps its meaning minus mu when ref is the
        # newest row and shift = mu − its old stored value.
        self._ref[:, idx] = last_raw.to(device=self.device, dtype=torch.float32)
        self._shift[:, idx] = mu - last_stored

    def append(self, slots: list[int], rows: torch.Tensor) -> None:
        """One new row for each of B distinct slots, at every layer. rows: [B, d]
        (one-layer bank) or [L, B, d]."""
        if not slots:
            return
        rows = self._layered(rows, "rows", 2)
        n_layers, s_cap, w, k = len(self.layers), self.capacity, self.window, self.k
        idx = torch.tensor(slots, device=self.device)
        fresh = [i for i, s in enumerate(slots) if self.count[s] == 0]
        if fresh:
            f = torch.tensor(fresh, device=self.device)
            self._start(idx[f], rows[:, f])
        x = self._store(idx, rows)  # [L, B, k]
        pos = torch.tensor([self.count[s] % w for s in slots], device=self.device)
        flat_slots = (torch.arange(n_layers, device=self.device)[:, None] * s_cap + idx[None, :]).reshape(-1)
        if self.triton:  # one fused launch for every layer: write the row, one Gram row and column
            backend.triton_gram_update().gram_update(
                self._ring.view(-1, w, k), self._gram.view(-1, w, w), x.reshape(-1, k).contiguous(), flat_slots,
                pos.repeat(n_layers))
        else:
            self._ring.view(-1, k).index_copy_(0, flat_slots * w + pos.repeat(n_layers), x.reshape(-1, k))
            # [L·B, 1, k] @ [L·B, k, W] -> the one new Gram row per slot and layer. (This
            # orientation: CPU bmm with a single output column is ~10x slower.)
            ring = self._ring.view(-1, w, k).index_select(0, flat_slots)  # [L·B, W, k]
            dots = torch.bmm(x.reshape(-1, 1, k), ring.transpose(1, 2)).view(n_layers, len(slots), w)
            self._gram[:, idx, pos, :] = dots
            self._gram.transpose(2, 3)[:, idx, pos, :] = dots
        for s in slots:
            self.count[s] += 1
        full = [i for i, s in enumerate(slots) if self._rebase_due(self.count[s])]
        if full:
            f = torch.tensor(full, device=self.device)
            self._rebase(idx[f], rows[:, f], x[:, f])

    def extend(self, slot: int, rows: torch.Tensor, boundaries: list[int] | None = None) -> list[tuple[int, torch.Tensor, int]]:
        """Many rows for one slot (a prefill chunk). rows: [n, d] (one-layer bank)
        or [L, n, d]. Returns, for each requested boundary t (row counts after this
        chunk's t−c0 rows), (t, Gram [V, V] or [L, V, V] of the window ending at t,
        centred over its V rows, V)."""
        rows = self._layered(rows, "rows", 2)
        n = rows.shape[1]
        if n == 0:
            return []
        w, c0 = self.window, self.count[slot]
        one = torch.tensor([slot], device=self.device)
        if c0 == 0:
            # The chunk's last row, not its first: a request's first row (BOS) is
            # usually the farthest from the others.
            self._start(one, rows[:, -1:])
        x = self._store(one.expand(n), rows)  # [L, n, k]
        prev = self._ordered(slot)  # [L, min(c0, W), k], oldest first
        out = []
        for t in boundaries or ():
            k_rows = t - c0
            if k_rows >= w:
                win = x[:, k_rows - w : k_rows]
            else:
                win = torch.cat([prev[:, max(0, prev.shape[1] - (w - k_rows)):], x[:, :k_rows]], dim=1)
            win = win - win.mean(dim=1, keepdim=True)  # centred first: no cancellation in the product
            g = win @ win.transpose(1, 2)  # [L, V, V]
            out.append((t, self._view(g), win.shape[1]))
        tail = torch.cat([prev, x], dim=1)[:, -w:]  # the new last W rows, oldest first
        m = tail.shape[1]
        mu = tail.mean(dim=1)  # [L, k]: the rebase of a prefill chunk (see the module doc)
        tail = tail - mu[:, None, :]
        c1 = c0 + n
        pos = torch.arange(c1 - m, c1, device=self.device) % w
        self._ring[:, slot, pos] = tail
        g = tail @ tail.transpose(1, 2)  # [L, m, m]: a prefill chunk recomputes this slot's Gram once
        self._gram[:, slot].zero_()
        self._gram[:, slot, pos[:, None], pos[None, :]] = g
        self._ref[:, slot] = rows[:, -1].to(device=self.device, dtype=torch.float32)
        self._shift[:, slot] = mu - x[:, -1]
        self.count[slot] = c1
        return out

    def _ordered(self, slot: int) -> torch.Tensor:
        """[L, min(count, W), k]: the slot's stored rows, oldest first."""
        c, w = self.count[slot], self.window
        m = min(c, w)
        if m == 0:
            return self._ring.new_zeros((len(self.layers), 0, self.k))
        pos = torch.arange(c - m, c, device=self.device) % w
        return self._ring[:, slot, pos]

    def window_gram(self, slots: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The current windows' raw Grams [B, W, W] (one-layer bank) or
        [L, B, W, W] (copies) and valid counts. Before a slot has W rows, its rows
        sit at positions 0..count−1."""
        idx = torch.tensor(slots, device=self.device)
        return self._view(self._gram[:, idx].clone()), [min(self.count[s], self.window) for s in slots]
