"""Batched incremental window state for many requests at once (torch; CPU or GPU).

One `WindowBank` per tapped layer holds, for S slots (one per monitored request):

    ring  [S, W, k]  the last W rows, row t of a slot at position t % W
    gram  [S, W, W]  raw inner products of the ring rows (not centred)
    ref   [S, d]     the slot's first row, subtracted from every row it stores

A decode step appends one row to each of B slots in one batched update: write
the row, one new row of dot products against the W ring rows, O(W·k) per
token, never a full O(W²·k) recompute. Eigenvalues are needed only every
`stride` tokens, from the centred valid block H·G·H / d (H = I − 11ᵀ/W), which
the Gram gives without touching the rows again; ring order does not matter
because a permutation does not change eigenvalues.

Why the reference row: hidden states carry a large common mean; centring a
raw fp32 Gram would subtract large numbers. Subtracting a fixed row first
changes no centred quantity (centring removes any constant row) and keeps the
stored values small.

Optional random projection to k < d dims (a fixed Gaussian per layer, entries
N(0, 1/k)): inner products are preserved in expectation, the noise spectrum
of Gram/d becomes MP with γ = (W−1)/k in the original σ² units, so layers of
different width are comparable at one fixed aspect ratio (FARMS-style).

Slots are taken from a free list: requests join and leave without moving the
others' state. Capacity doubles when full (a rare copy), up to `max_slots`.
"""

from __future__ import annotations

import torch

from . import backend


def centre_gram(gram: torch.Tensor, valid) -> torch.Tensor:
    """gram: [B, W, W] raw inner products; valid: int, list or [B] rows in use
    (positions < valid). Returns H·G·H on the valid block, zeros elsewhere."""
    b, w, _ = gram.shape
    g = gram.to(torch.float64)
    if isinstance(valid, int):
        valid = torch.full((b,), valid, dtype=torch.int64, device=gram.device)
    elif not isinstance(valid, torch.Tensor):
        valid = torch.tensor(list(valid), dtype=torch.int64, device=gram.device)
    mask = (torch.arange(w, device=gram.device)[None, :] < valid[:, None]).to(g.dtype)  # [B, W]
    g = g * mask[:, :, None] * mask[:, None, :]
    n = valid.to(g.dtype).clamp_min(1)[:, None]  # [B, 1]
    row_mean = g.sum(-1) / n  # [B, W]
    total = row_mean.sum(-1, keepdim=True) / n  # [B, 1]
    c = g - row_mean[:, :, None] - row_mean[:, None, :] + total[:, :, None]
    return c * mask[:, :, None] * mask[:, None, :]


def gram_eigvalsh(gram: torch.Tensor, valid, dim: int) -> torch.Tensor:
    """[B, W, W] raw Gram -> [B, W] float64 descending eigenvalues of the
    centred valid block / dim (the padding part contributes zeros)."""
    c = centre_gram(gram, valid) / dim
    return torch.linalg.eigvalsh(c).flip(-1).clamp_min(0.0)


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
        self.count = [0] * s  # rows seen per slot (host-side: drives boundaries)
        self.triton = backend.use_triton(self.device)
        self.free = list(range(s - 1, -1, -1))

    # ---- slots -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.ring.shape[0]

    def ensure(self, slot: int) -> None:
        """Make `slot` addressable (callers that number slots themselves)."""
        if slot >= self.max_slots:
            raise ValueError(f"slot: {slot} is past max_slots={self.max_slots}")
        if slot >= self.capacity:
            new = self.capacity
            while new <= slot:
                new *= 2
            self._grow(min(new, self.max_slots))
            self.free = [f for f in self.free if f != slot]

    def reset(self, slot: int) -> None:
        if slot < self.capacity:
            self.count[slot] = 0

    def alloc(self) -> int | None:
        if not self.free:
            if self.capacity >= self.max_slots:
                return None
            self._grow(min(2 * self.capacity, self.max_slots))
        slot = self.free.pop()
        self.count[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.count[slot] = 0
        self.free.append(slot)

    def _grow(self, new: int) -> None:
        old = self.capacity
        grow = lambda t: torch.cat([t, t.new_zeros((new - old, *t.shape[1:]))])
        self.ring, self.gram, self.ref = grow(self.ring), grow(self.gram), grow(self.ref)
        self.count += [0] * (new - old)
        self.free.extend(range(new - 1, old - 1, -1))

    # ---- rows ---------------------------------------------------------------------------
    def _store(self, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        x = rows.to(device=self.device, dtype=torch.float32) - self.ref[slots]
        return x if self.proj is None else x @ self.proj

    def append(self, slots: list[int], rows: torch.Tensor) -> None:
        """One new row for each of B distinct slots. rows: [B, d]."""
        if not slots:
            return
        w = self.window
        idx = torch.tensor(slots, device=self.device)
        fresh = [i for i, s in enumerate(slots) if self.count[s] == 0]
        if fresh:
            f = torch.tensor(fresh, device=self.device)
            self.ref[idx[f]] = rows[f].to(device=self.device, dtype=torch.float32)
        x = self._store(idx, rows)  # [B, k]
        pos = torch.tensor([self.count[s] % w for s in slots], device=self.device)
        if self.triton:  # one fused launch: write the row, one Gram row and column
            backend.triton_spectra().gram_update(self.ring, self.gram, x.contiguous(), idx, pos)
            for s in slots:
                self.count[s] += 1
            return
        self.ring.view(-1, self.k).index_copy_(0, idx * w + pos, x)
        # [B, 1, k] @ [B, k, W] -> the one new Gram row per slot, [B, W]. (This
        # orientation: CPU bmm with a single output column is ~10x slower.)
        dots = torch.bmm(x[:, None, :], self.ring.index_select(0, idx).transpose(1, 2))[:, 0, :]
        self.gram[idx, pos, :] = dots
        self.gram[idx, :, pos] = dots
        for s in slots:
            self.count[s] += 1

    def extend(self, slot: int, rows: torch.Tensor, boundaries: list[int] | None = None) -> list[tuple[int, torch.Tensor, int]]:
        """Many rows for one slot (a prefill chunk). rows: [n, d]. Returns, for
        each requested boundary t (row counts after this chunk's t−c0 rows),
        (t, raw Gram [V, V] of the window ending at t, V)."""
        n = rows.shape[0]
        if n == 0:
            return []
        w, c0 = self.window, self.count[slot]
        if c0 == 0:
            self.ref[slot] = rows[0].to(device=self.device, dtype=torch.float32)
        idx = torch.full((n,), slot, device=self.device)
        x = self._store(idx, rows)  # [n, k]
        prev = self._ordered(slot)  # [min(c0, W), k], oldest first
        out = []
        for t in boundaries or ():
            k_rows = t - c0
            win = x[k_rows - w : k_rows] if k_rows >= w else torch.cat([prev[max(0, prev.shape[0] - (w - k_rows)):], x[:k_rows]])
            out.append((t, win @ win.T, win.shape[0]))
        tail = torch.cat([prev, x])[-w:]  # the new last W rows, oldest first
        m = tail.shape[0]
        c1 = c0 + n
        pos = torch.arange(c1 - m, c1, device=self.device) % w
        self.ring[slot, pos] = tail
        g = tail @ tail.T  # [m, m]: a prefill chunk recomputes this slot's Gram once
        self.gram[slot].zero_()
        self.gram[slot, pos[:, None], pos[None, :]] = g
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
