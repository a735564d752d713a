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
constant changes no centred quantity, so each slot is rebased whenever its
ring has been refilled (every W rows, and after every prefill chunk): ref
becomes the newest raw row, shift the window's mean relative to it, and the
ring and Gram are recomputed from the re-centred rows, O(W²·k) once per W
rows, the same order as the per-row update.

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
    def __init__(self, window: int, dim: int, proj_dim: int | None = None, *, max_slots: int = 1024,
                 initial_slots: int = 16, device: torch.device | str = "cpu", seed: int = 0):
        if window < 2:
            raise ValueError(f"window: a spectrum needs at least 2 rows, got {window}")
        if dim < 1:
            raise ValueError(f"dim: must be >= 1, got {dim}")
        if proj_dim is not None and not 1 <= proj_dim <= dim:
            raise ValueError(f"proj_dim: must lie in [1, dim={dim}] or be None, got {proj_dim}")
        if max_slots < 1:
            raise ValueError(f"max_slots: must be >= 1, got {max_slots}")
        self.window, self.dim = window, dim
        self.k = proj_dim or dim
        self.device = torch.device(device)
        self.max_slots = max_slots
        self.proj = None
        if proj_dim is not None:
            g = torch.Generator(device="cpu").manual_seed(seed)
            self.proj = (torch.randn(dim, proj_dim, generator=g) / proj_dim**0.5).to(self.device)
        s = min(initial_slots, max_slots)
        self.ring = torch.zeros(s, window, self.k, device=self.device)
        self.gram = torch.zeros(s, window, window, device=self.device)
        self.ref = torch.zeros(s, dim, device=self.device)
        self.shift = torch.zeros(s, self.k, device=self.device)
        self.count = [0] * s  # rows seen per slot (host-side: drives boundaries)
        self.triton = backend.use_triton(self.device)

    # ---- slots -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.ring.shape[0]

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
        grow = lambda t: torch.cat([t, t.new_zeros((new - old, *t.shape[1:]))])
        self.ring, self.gram = grow(self.ring), grow(self.gram)
        self.ref, self.shift = grow(self.ref), grow(self.shift)
        self.count += [0] * (new - old)

    # ---- rows ---------------------------------------------------------------------------
    def _store(self, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """rows [B, d] raw -> [B, k] as the slots store them."""
        x = rows.to(device=self.device, dtype=torch.float32) - self.ref[slots]
        x = x if self.proj is None else x @ self.proj
        return x - self.shift[slots]

    def _start(self, idx: torch.Tensor, first: torch.Tensor) -> None:
        """Fresh slots idx [B] take their first raw row [B, d] as the reference."""
        self.ref[idx] = first.to(device=self.device, dtype=torch.float32)
        self.shift[idx] = 0.0

    def _rebase(self, idx: torch.Tensor, last_raw: torch.Tensor, last_stored: torch.Tensor) -> None:
        """Slots idx [B] whose W ring rows are all valid: re-centre them. last_raw [B, d]
        and last_stored [B, k]: the newest row, raw and as stored before the rebase."""
        ring = self.ring[idx]  # [B, W, k]
        mu = ring.mean(dim=1)  # [B, k]
        ring = ring - mu[:, None, :]
        self.ring[idx] = ring
        self.gram[idx] = torch.bmm(ring, ring.transpose(1, 2))
        # stored(x) = (x − ref)P − shift keeps its meaning minus mu when ref is the
        # newest row and shift = mu − its old stored value.
        self.ref[idx] = last_raw.to(device=self.device, dtype=torch.float32)
        self.shift[idx] = mu - last_stored

    def append(self, slots: list[int], rows: torch.Tensor) -> None:
        """One new row for each of B distinct slots. rows: [B, d]."""
        if not slots:
            return
        w = self.window
        idx = torch.tensor(slots, device=self.device)
        fresh = [i for i, s in enumerate(slots) if self.count[s] == 0]
        if fresh:
            f = torch.tensor(fresh, device=self.device)
            self._start(idx[f], rows[f])
        x = self._store(idx, rows)  # [B, k]
        pos = torch.tensor([self.count[s] % w for s in slots], device=self.device)
        if self.triton:  # one fused launch: write the row, one Gram row and column
            backend.triton_gram_update().gram_update(self.ring, self.gram, x.contiguous(), idx, pos)
        else:
            self.ring.view(-1, self.k).index_copy_(0, idx * w + pos, x)
            # [B, 1, k] @ [B, k, W] -> the one new Gram row per slot, [B, W]. (This
            # orientation: CPU bmm with a single output column is ~10x slower.)
            dots = torch.bmm(x[:, None, :], self.ring.index_select(0, idx).transpose(1, 2))[:, 0, :]
            self.gram[idx, pos, :] = dots
            self.gram[idx, :, pos] = dots
        for s in slots:
            self.count[s] += 1
        full = [i for i, s in enumerate(slots) if self.count[s] % w == 0]
        if full:
            f = torch.tensor(full, device=self.device)
            self._rebase(idx[f], rows[f], x[f])

    def extend(self, slot: int, rows: torch.Tensor, boundaries: list[int] | None = None) -> list[tuple[int, torch.Tensor, int]]:
        """Many rows for one slot (a prefill chunk). rows: [n, d]. Returns, for
        each requested boundary t (row counts after this chunk's t−c0 rows),
        (t, Gram [V, V] of the window ending at t, centred over its V rows)."""
        n = rows.shape[0]
        if n == 0:
            return []
        w, c0 = self.window, self.count[slot]
        one = torch.tensor([slot], device=self.device)
        if c0 == 0:
            # The chunk's last row, not its first: a request's first row (BOS) is
            # usually the farthest from the others.
            self._start(one, rows[-1:])
        idx = one.expand(n)
        x = self._store(idx, rows)  # [n, k]
        prev = self._ordered(slot)  # [min(c0, W), k], oldest first
        out = []
        for t in boundaries or ():
            k_rows = t - c0
            win = x[k_rows - w : k_rows] if k_rows >= w else torch.cat([prev[max(0, prev.shape[0] - (w - k_rows)):], x[:k_rows]])
            win = win - win.mean(dim=0, keepdim=True)  # centred first: no cancellation in the product
            out.append((t, win @ win.T, win.shape[0]))
        tail = torch.cat([prev, x])[-w:]  # the new last W rows, oldest first
        m = tail.shape[0]
        mu = tail.mean(dim=0)  # [k]: the rebase of a prefill chunk (see the module doc)
        tail = tail - mu
        c1 = c0 + n
        pos = torch.arange(c1 - m, c1, device=self.device) % w
        self.ring[slot, pos] = tail
        g = tail @ tail.T  # [m, m]: a prefill chunk recomputes this slot's Gram once
        self.gram[slot].zero_()
        self.gram[slot, pos[:, None], pos[None, :]] = g
        self.ref[slot] = rows[-1].to(device=self.device, dtype=torch.float32)
        self.shift[slot] = mu - x[-1]
        self.count[slot] = c1
        return out

    def _ordered(self, slot: int) -> torch.Tensor:
        c, w = self.count[slot], self.window
        m = min(c, w)
        if m == 0:
            return self.ring.new_zeros((0, self.k))
        pos = torch.arange(c - m, c, device=self.device) % w
        return self.ring[slot, pos]

    def window_gram(self, slots: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The current windows' raw Grams [B, W, W] (copies) and valid counts.
        Before a slot has W rows, its rows sit at positions 0..count−1."""
        idx = torch.tensor(slots, device=self.device)
        return self.gram[idx].clone(), [min(self.count[s], self.window) for s in slots]
