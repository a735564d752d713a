"""Streaming top-eigenvector sketches: the dominant direction(s) of a tapped layer's activation stream.

Rows a_t ∈ R^d arrive in batches ([n, d], numpy or torch on any device); every sketch estimates the top
eigenvector(s) of the stream's second-moment matrix AᵀA = Σ_t a_t a_tᵀ (not centred) in O(d·polylog)
memory, so a monitor can compare the current direction with a reference one (`principal_angle_degrees`).

Three sketches, one API: `update(rows)`, `estimate()`, `state_dict()`, `from_state_dict(state)`, and
`merge(other)` for the one whose algorithm allows it.

Guarantee relied on, and memory in floats (d = row width; details in each class docstring):
- `OjaGrid` (Price–Xun style, any order): fixed-η Oja, v ∝ Π_t (I + η a_t a_tᵀ) v₀, behaves like
  exp(η AᵀA) v₀ in any row order when every factor is a small perturbation (η‖a_t‖² ≤ τ) and the gap
  R = λ₁/λ₂ is large enough (Ω(log n·log d) in Price–Xun, Ω(log² d) per Kacham–Woodruff). A run that
  meets a row with η‖a‖² > τ is reported failed instead of trusted. Rows heavier than `clip_ratio` × the
  running mean ‖a‖² (bursts) enter every run scaled down to that energy, so each run's fixed point is the
  top eigenvector of AᵀA − D with D ⪰ 0, tr D = the clipped energy (counted): by Davis–Kahan
  (Yu–Wang–Samworth) it is within sin θ ≤ 2·tr D/(λ₁ − λ₂) of v₁. The right η is unknown in advance: G
  runs on a geometric grid; each run's last iterate and its tail average (Polyak: the mean of the
  last 1/2–3/4 of the block iterates, which cancels the iterate noise a large η leaves and keeps the
  better early iterates of an adversarially sorted stream) are candidates, and the one with the largest
  Rayleigh quotient on a held-back uniform sample of m rows is returned (RQ(u) ≥ λ₁ − ε implies
  sin²θ ≤ ε/(λ₁ − λ₂), so selection is as good as the sample's RQ estimate: relative error ≈ √(2/m) per
  candidate, less for the difference of two close ones; m = 1024 by default). Memory (4G + m + 1)·d, plus
  a [G, b, b] solve per block of b rows.
- `StackedPower`: `HeavyLight`'s light path (history power steps, no shuffle, no heavy buffer) on L
  streams at once, batched; the live tap's window sketch. Memory 3·L·k·d.
- `HeavyLight` (Kacham–Woodruff style, random order): rows with ‖a‖² ≥ ‖A‖_F²/(d·ln²d) ("heavy"; at most
  d·ln²d exist) are kept exactly, at most H of them; in random order the light rows of each epoch
  are a uniform sample of the light stream, so one block power step per epoch with that sample plus
  the exact heavy rows converges like the power method (correlation 1 − O(1/√R) in their analysis,
  `history=False`). A shuffle buffer of S rows makes short-range autocorrelated token streams look
  random; the default `history=True` also carries every past epoch onto the new basis (a heuristic,
  see the class), which survives a stream sorted over its whole length. Memory (S + H + 5k)·d.
- `FrequentDirections` (Ghashami–Liberty–Phillips–Woodruff; any order, deterministic, mergeable):
  0 ≤ ‖Ax‖² − ‖Bx‖² ≤ Δ ≤ ‖A − A_k‖_F²/(ℓ − k) for every unit x and k < ℓ, with Δ tracked exactly.
  Memory m·d, m = 2ℓ by default.

Batching (the tap sends a few hundred rows per step, on the model's device): the Oja recurrence is
sequential, but a block of b rows has a closed form. With c_i = a_iᵀ v_{i-1}, v_b = v₀ + η Σ_i a_i c_i and
(I − η·tril(X Xᵀ, −1)) c = X v₀: one b×b Gram, one unit-lower-triangular solve per η (batched over the
grid as [G, b, b]) and two [G, d]×[d, b] products replace b sequential rank-1 updates, exactly (to
rounding), for all G learning rates at once. Cost per row ≈ b·d (Gram) + 4·G·d + G·b/2; b = 64 measured
best here (d = 1024, G = 12, one core: 2.0–2.5× the per-row loop vectorised over the grid in numpy;
`bench/bench_sketch.py --sweep`), and on a GPU the point is the launch count: ~15 kernels per block
instead of ~3 per row. `update` reads no device value back to the host (data-dependent counters stay
device tensors), except once at OjaGrid's first update (the step scale) and at each FrequentDirections
shrink (torch's eigh checks its status on the host: set `buffer` so it shrinks once a step); the random choices (reservoir, shuffle) come from
a counter-based hash of (seed, row index), so numpy and torch make the same choices and a reloaded
state continues exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "OjaGridConfig", "OjaGrid", "HeavyLightConfig", "HeavyLight", "FDConfig", "FrequentDirections",
    "StackedPower", "SketchFailure", "principal_angle_degrees", "from_state_dict", "oja_block", "leading_directions",
]

STATE_VERSION = 3  # 2: OjaGrid keeps clipped rows/energy and ‖A‖_F²; 3: and each run's checkpoint
_M32 = 0xFFFFFFFF


class SketchFailure(RuntimeError):
    """Every run of a sketch broke its own precondition (e.g. all η too large for the heaviest row)."""


# ---- array backends: the same sketch code runs on numpy or on torch (any device) ----

class _NumpyOps:
    torch = False
    device = None

    def dtype(self, name):
        return np.dtype(name)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=self.dtype(dtype) if isinstance(dtype, str) else dtype)

    def from_host(self, a, dtype=None):
        return np.array(a, dtype=None if dtype is None else self.dtype(dtype), copy=True)

    def to_host(self, x):
        return np.array(x, copy=True)

    def rows(self, x, dtype):
        if not isinstance(x, np.ndarray):
            x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        return x.astype(dtype, copy=False)

    def arange(self, start, n):
        return np.arange(start, start + n, dtype=np.int64)

    def cat(self, xs):
        return np.concatenate(xs, axis=0)

    def copy(self, x):
        return x.copy()

    def cast(self, x, dtype):
        return x.astype(self.dtype(dtype) if isinstance(dtype, str) else dtype)

    def where(self, c, a, b):
        return np.where(c, a, b)

    def maximum(self, a, b):
        return np.maximum(a, b)

    def amax(self, x, axis):
        return x.max(axis=axis)

    def clamp_min(self, x, low):
        return np.maximum(x, low)

    def flip(self, x, axis):
        return np.flip(x, axis)

    def argsort_desc(self, x):
        return np.argsort(-x, kind="stable")

    def scatter_max(self, size, idx, vals, fill):
        out = np.full(size, fill, dtype=vals.dtype)
        np.maximum.at(out, idx, vals)
        return out

    def tril(self, x, k):
        return np.tril(x, k)

    def isfinite(self, x):
        return np.isfinite(x)

    def solve_unit_lower(self, eta, low, rhs, weight=None):
        # (I − η_g·low·diag(ω_g)) c_g = rhs_g for each g; low: [b, b] strictly lower, rhs: [G, b], ω: [G, b] or None
        from scipy.linalg.blas import get_blas_funcs

        trsm = get_blas_funcs("trsm", (low,))  # BLAS directly: scipy's checked wrapper costs more than a 128² solve
        eye = np.eye(low.shape[0], dtype=low.dtype)
        out = np.empty_like(rhs)
        for g in range(rhs.shape[0]):
            m = low if weight is None else low * weight[g][None, :]
            out[g] = trsm(1.0, eye - eta[g] * m, rhs[g][:, None], lower=1, diag=1)[:, 0]
        return out

    def eigh(self, g):
        return np.linalg.eigh(g)

    def qr(self, w):
        return np.linalg.qr(w)

    def item(self, x):
        return x.item()


class _TorchOps:
    torch = True

    def __init__(self, device):
        import torch

        self.t = torch
        self.device = torch.device(device)

    def dtype(self, name):
        return getattr(self.t, name)

    def zeros(self, shape, dtype):
        return self.t.zeros(shape, dtype=self.dtype(dtype) if isinstance(dtype, str) else dtype,
                            device=self.device)

    def from_host(self, a, dtype=None):
        x = self.t.as_tensor(np.array(a, copy=True))
        return x.to(device=self.device, dtype=None if dtype is None else self.dtype(dtype))

    def to_host(self, x):
        return x.detach().cpu().numpy().copy()

    def rows(self, x, dtype):
        if not isinstance(x, self.t.Tensor):
            x = self.t.as_tensor(np.asarray(x))
        return x.detach().to(device=self.device, dtype=dtype)

    def arange(self, start, n):
        return self.t.arange(start, start + n, dtype=self.t.int64, device=self.device)

    def cat(self, xs):
        return self.t.cat(xs, 0)

    def copy(self, x):
        return x.clone()

    def cast(self, x, dtype):
        return x.to(self.dtype(dtype) if isinstance(dtype, str) else dtype)

    def where(self, c, a, b):
        return self.t.where(c, a, b)

    def maximum(self, a, b):
        return self.t.maximum(a, b)

    def amax(self, x, axis):
        return x.amax(axis)

    def clamp_min(self, x, low):
        return x.clamp_min(low)

    def flip(self, x, axis):
        return x.flip(axis)

    def argsort_desc(self, x):
        return self.t.argsort(-x, stable=True)

    def scatter_max(self, size, idx, vals, fill):
        out = self.t.full((size,), fill, dtype=vals.dtype, device=self.device)
        return out.scatter_reduce(0, idx, vals, reduce="amax")

    def tril(self, x, k):
        return self.t.tril(x, k)

    def isfinite(self, x):
        return self.t.isfinite(x)

    def solve_unit_lower(self, eta, low, rhs, weight=None):
        b = low.shape[0]
        eye = self.t.eye(b, dtype=low.dtype, device=self.device)
        scaled = low[None] if weight is None else low[None] * weight[:, None, :]
        m = eye[None] - eta[:, None, None] * scaled  # [G, b, b]
        return self.t.linalg.solve_triangular(m, rhs[:, :, None], upper=False, unitriangular=True)[:, :, 0]

    def eigh(self, g):
        return self.t.linalg.eigh(g)

    def qr(self, w):
        return self.t.linalg.qr(w)

    def item(self, x):
        return x.item()


def _ops(device):
    return _NumpyOps() if device is None else _TorchOps(device)


def _check_dtype(dtype: str) -> str:
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
    return dtype


def _mix32(x):
    # Integer finaliser on values in [0, 2^32): products stay below 2^59, so int64 never overflows.
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def _salt(seed: int, stream: int) -> int:
    return int(_mix32(np.int64((seed * 0x9E3779B1 + stream * 0x85EBCA6B) & _M32)))


def _uniform(xp, idx, seed: int, stream: int):
    """idx: int64 [n] (any backend) -> float64 [n] in [0, 1), a pure function of (seed, stream, idx):
    numpy and torch draw the same numbers, and a reloaded sketch continues the same sequence."""
    hi = _mix32((idx >> 32) ^ _salt(seed, stream))
    h = _mix32((idx & _M32) ^ hi)
    return xp.cast(h, "float64") * (1.0 / 4294967296.0)  # explicit: torch would promote int·float to float32


def _sign_fix(xp, v):
    # v: [d] or [d, k]; make the largest-|.| entry of each column positive (eigenvectors have no sign).
    v2 = v if v.ndim == 2 else v[:, None]
    idx = abs(v2).argmax(0)
    pick = v2[idx, xp.arange(0, v2.shape[1])]
    s = xp.where(pick < 0, -1.0, 1.0)
    out = v2 * xp.cast(s, v2.dtype)[None, :]
    return out if v.ndim == 2 else out[:, 0]


def _prepare_rows(xp, rows, dim: int, dtype):
    """rows: [n, dim] array/tensor (or [dim] for one row) -> (x [n, dim] on the sketch's backend,
    finite mask [n], squared row norms [n]). Rows whose squared norm is not finite (NaN/inf entries,
    or an overflowing norm) are zeroed, since they would poison every later estimate, and counted by
    the caller; no host sync. One pass for the norms; the zeroing copy is skipped on numpy when clean."""
    shape = tuple(rows.shape)
    if len(shape) == 1:
        rows = rows[None, :]
        shape = tuple(rows.shape)
    if len(shape) != 2 or shape[1] != dim:
        raise ValueError(f"rows: expected [n, {dim}], got {shape}")
    x = xp.rows(rows, xp.dtype(dtype))
    n2 = (x * x).sum(-1)  # [n]
    finite = xp.isfinite(n2)
    if xp.torch or not finite.all():
        x = xp.where(finite[:, None], x, 0.0)
        n2 = xp.where(finite, n2, 0.0)
    return x, finite, n2


def _orth(xp, w):
    """w: [d, k] -> orthonormal basis [d, k] of its columns, signs fixed so diag(R) ≥ 0 (backend-independent)."""
    q, r = xp.qr(w)
    d = r.diagonal() if xp.torch else np.diagonal(r)
    s = xp.where(d < 0, -1.0, 1.0)
    return q * xp.cast(s, q.dtype)[None, :]


def _check_positive_int(name: str, value, low: int = 1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def _check_state(state, kind: str):
    if not isinstance(state, dict) or state.get("kind") != kind:
        got = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state: expected a {kind!r} state_dict, got {got!r}")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"state: version {state.get('version')!r} is not supported (expected {STATE_VERSION})")


# ---- (1) OjaGrid: fixed-η Oja on a geometric grid, selection on a held-back sample ----

def oja_block(xp, v, x, eta, weight=None):
    """b sequential fixed-η Oja steps v ← v + η ω a (aᵀv), for G learning rates at once, in closed form.

    v: [G, d] unit rows, x: [b, d], eta: [G], weight: None (ω = 1) or [G, b] per-run row weights ω_{g,i}
    -> [G, d] unit rows. With c_i = a_iᵀ v_{i−1} (the value each row sees), v_b = v₀ + η Σ_i ω_i a_i c_i
    and c_i = a_iᵀv₀ + η Σ_{j<i} ω_j (a_iᵀa_j) c_j, i.e. (I − η·tril(X Xᵀ, −1)·diag(ω)) c = X v₀: one
    [b, b] Gram, one unit-lower-triangular solve per η and two [G, d]×[d, b] products, identical to the
    row loop up to rounding. Growth inside a block is at most Π(1 + η ω_i ‖a_i‖²), which the load rule
    (η ω ‖a‖² ≤ τ, by clipping or failure) keeps far from overflow for b ≤ a few hundred.
    """
    low = xp.tril(x @ x.T, -1)  # [b, b]
    c = xp.solve_unit_lower(eta, low, v @ x.T, weight)  # [G, b]
    if weight is not None:
        c = c * weight
    w = v + eta[:, None] * (c @ x)  # [G, d]
    return w / ((w * w).sum(-1) ** 0.5)[:, None]


@dataclass(frozen=True)
class OjaGridConfig:
    dim: int
    grid_min: float = 1e-5   # smallest dimensionless step h; η_g = h_g / row_scale
    grid_ratio: float = 2.0  # h_{g+1} / h_g
    grid_size: int = 12      # G runs
    holdout: int = 1024      # m rows of the held-back uniform sample used to pick η (class doc: why 1024)
    tau: float = 0.25        # largest load η‖a‖² a row may put on a run (clipped to it, or the run fails)
    clip_ratio: float | None = 8.0  # rows with ‖a‖² > clip_ratio × the running mean enter every run scaled down
                                    # to that energy (None: never); the left-out energy is tracked
    row_scale: float | None = None  # None: mean ‖a‖² of the first update (fixed from then on)
    block: int = 64          # b rows per closed-form Oja block (cost ∝ b·d + 4·G·d per row; bench --sweep)
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        _check_positive_int("dim", self.dim)
        _check_positive_int("grid_size", self.grid_size)
        _check_positive_int("holdout", self.holdout)
        _check_positive_int("block", self.block)
        if not (np.isfinite(self.grid_min) and self.grid_min > 0):
            raise ValueError(f"grid_min: expected a finite step > 0, got {self.grid_min!r}")
        if not (np.isfinite(self.grid_ratio) and self.grid_ratio > 1):
            raise ValueError(f"grid_ratio: expected a finite ratio > 1, got {self.grid_ratio!r}")
        if not (np.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau: expected a finite load > 0, got {self.tau!r}")
        if self.clip_ratio is not None and not (np.isfinite(self.clip_ratio) and self.clip_ratio >= 1):
            raise ValueError(f"clip_ratio: expected None or a finite ratio >= 1, got {self.clip_ratio!r}")
        if self.row_scale is not None and not (np.isfinite(self.row_scale) and self.row_scale > 0):
            raise ValueError(f"row_scale: expected None or a finite mean squared row norm > 0, got {self.row_scale!r}")
        _check_dtype(self.dtype)

    @property
    def steps(self) -> np.ndarray:
        return self.grid_min * self.grid_ratio ** np.arange(self.grid_size, dtype=np.float64)


class OjaGrid:
    """G fixed-η Oja runs (η on a geometric grid) over all rows except a held-back uniform sample.

    Guarantee relied on (Price–Xun, arbitrary order): for a fixed η with η‖a_t‖² ≤ τ for every row,
    Π_t (I + η a_t a_tᵀ) acts like exp(η AᵀA), so v₀ is pulled onto v₁ by a factor exp(η(λ₁ − λ₂))
    whatever the order, provided η(λ₁ − λ₂) ≫ log d and η is small enough that the commutator terms
    (order η²) stay below the gap. The right η depends on ‖A‖ and n, unknown in advance: G runs cover a
    geometric grid, and the run with the largest Rayleigh quotient ‖R v‖² on the held-back sample R
    (m rows drawn uniformly from the whole stream by reservoir sampling, never fed to any run) is
    returned; runs that met a row with η‖a‖² > τ are reported failed and never returned.
    η_g = h_g / s with s the mean squared row norm of the first update (or `row_scale`), frozen after.

    Clipping (`clip_ratio`, default 8): a fed row with ‖a‖² above clip_ratio × the mean ‖a‖² of the rows
    fed before its block enters every run as ω·a aᵀ with ω = cap/‖a‖²; status() reports the rows and the
    energy Σ(1 − ω)‖a‖² left out (the tr D of the module docstring's bound). A burst of heavy rows along
    one direction then cannot kick the large-η runs (bench `bursts`). `clip_ratio=None` is the strict
    Price–Xun rule alone. Candidates: each run's last iterate, its tail average and its checkpoint
    (`candidates()`): at every epoch end (blocks 1, 2, 4, 8, ...) the iterate replaces the run's kept
    checkpoint when its Rayleigh quotient on the held-back sample as it is then is the larger. Why: in an
    adversarial order whose last rows carry no v₁ (bench `sorted`), every fixed-η run forgets v₁ over the
    tail, and the last iterate and the tail average both come too late; the checkpoint keeps the point a
    run had reached. All candidates still compete on the final sample, so the guarantee above is kept.

    Selection, what it relies on: the m sample rows were fed to no run, so for two candidates u, w the
    sample's RQ(u) − RQ(w) is an unbiased estimate of the whole stream's, with variance
    Var[(aᵀu)² − (aᵀw)²]/m (for Gaussian rows 2[(uᵀCu)² + (wᵀCw)² − 2(uᵀCw)²]/m, C the second moment:
    small for close candidates, ≈ 2·RQ²/m for far ones). A candidate δ below the best wins only when that
    noise exceeds δ, and the largest of 3G noisy scores is picked, so m must make √(2/m) well below the
    relative RQ gap between a good and a bad candidate. That gap is small when the gap R is: at d = 1024,
    n = 200k, R = 1.5 in sorted order a candidate with |⟨u, v₁⟩| = 0.883 has an RQ only 7% below the best
    (its lost mass sits on λ₂ = λ₁/1.5), and m = 256 (√(2/m) = 8.8%) picked it; m = 1024 (4.4%) picks a
    0.999 checkpoint. Resampling that run's final candidates from a Gaussian with the stream's C, 200
    draws: a pick below 0.98 in 4% of draws at m = 256, 0.5% at 1024, none at 2048. Rows are not fed
    to a run while they are in the sample; a row evicted from it is fed then, in the place of the row that
    displaced it, so the runs see every row but the m left in the sample at the end (the order changes
    only for those evicted rows, which arrive later than they came).

    Memory: V, two tail sums and the checkpoints [G, d] each + the sample [m + 1, d]: (4G + m + 1)·d floats
    (1073·d at the defaults, about HeavyLight's 1128·d); per block of b rows a [G, b, b] solve workspace
    and a [b, d] gather. Not mergeable (two Oja products do not combine).
    """

    kind = "oja_grid"

    def __init__(self, dim: int | None = None, *, config: OjaGridConfig | None = None, device=None, **kwargs):
        if config is None:
            config = OjaGridConfig(dim=dim, **kwargs)
        elif dim is not None or kwargs:
            raise ValueError("config: pass either config= or dim/keyword arguments, not both")
        self.config = cfg = config
        self.xp = xp = _ops(device)
        g, d, m = cfg.grid_size, cfg.dim, cfg.holdout
        v0 = np.random.default_rng(cfg.seed).standard_normal(d)
        v0 /= np.linalg.norm(v0)
        self.v = xp.from_host(np.tile(v0, (g, 1)), cfg.dtype)  # [G, d] unit rows
        self.steps = xp.from_host(cfg.steps, cfg.dtype)  # [G] dimensionless h_g
        self.eta = None  # [G] device, set at the first update
        self.scale = cfg.row_scale
        self.holdout = xp.zeros((m + 1, d), cfg.dtype)  # row m: write target for discarded candidates
        self.failed = xp.zeros((g,), "bool")
        self.heavy_rows = xp.zeros((g,), "int64")  # per run: rows with η‖a‖² > tau
        self.max_load = xp.zeros((g,), cfg.dtype)  # per run: max η‖a‖² seen
        self.clipped = xp.zeros((), "float64")  # Σ (1 − ω)‖a‖²: the energy clipping left out of every run
        self.clipped_rows = xp.zeros((), "int64")
        self.fro2 = xp.zeros((), "float64")  # ‖A‖_F² of the rows fed to the runs
        self.fed = xp.zeros((), "float64")  # rows fed to the runs
        # Tail averages of each run's iterate (one snapshot per block): `avg_cur` sums this epoch's blocks,
        # `avg_prev` the previous epoch's; an epoch ends when it has as many blocks as all epochs before it,
        # so prev + cur always covers the last 1/2 to 3/4 of the blocks.
        self.avg_cur = xp.zeros((g, d), cfg.dtype)
        self.avg_prev = xp.zeros((g, d), cfg.dtype)
        self.blocks_cur = 0
        self.blocks_before = 0  # blocks before the current epoch
        self.best = self.v * 1  # [G, d] each run's checkpoint (see the class doc)
        self.nonfinite = xp.zeros((), "int64")
        self.seen = 0  # rows offered (host count: from shapes only)

    # -- update --
    def update(self, rows) -> None:
        cfg, xp = self.config, self.xp
        x, finite, n2 = _prepare_rows(xp, rows, cfg.dim, cfg.dtype)
        self.nonfinite = self.nonfinite + (~finite).sum()
        if x.shape[0] == 0:
            return
        if self.eta is None:
            if self.scale is None:
                # One host read, at the first update only: the step scale must be a fixed number.
                s = float(xp.item(n2.mean()))
                if not (s > 0 and math.isfinite(s)):
                    raise ValueError(f"rows: the first update sets the step scale (mean ‖a‖²) and gave {s!r}; "
                                     "pass row_scale= or start with non-zero rows")
                self.scale = s
            self.eta = self.steps / self.scale
        for start in range(0, x.shape[0], cfg.block):
            self._block(x[start:start + cfg.block], n2[start:start + cfg.block])

    def _block(self, x, n2):
        # x: [b, d], n2: [b] squared norms
        cfg, xp = self.config, self.xp
        b, m = x.shape[0], cfg.holdout
        t = xp.arange(self.seen, b)  # [b] global row index
        # Reservoir sampling (Algorithm R): row t is held back with probability m/(t+1), into a uniform slot.
        admit = _uniform(xp, t, cfg.seed, 1) * (t + 1) < m
        slot = xp.where(t < m, t, xp.cast(_uniform(xp, t, cfg.seed, 2) * m, "int64"))
        slot = xp.where(admit, xp.where(slot < m, slot, m - 1), m)
        pos = xp.arange(0, b)
        last = xp.scatter_max(m + 1, slot, xp.where(admit, pos, -1), -1)  # last admitted writer per slot
        winner = admit & (last[slot] == pos)
        # A winner displaces the row its slot held before this block (slots [0, min(seen, m)) are filled):
        # that row leaves the sample, so it is fed to the runs now, in the winner's place. An admitted row
        # that a later row of this block overwrites is fed where it stands. So every row but the m in the
        # sample reaches the runs, and no row is fed while it is in the sample (the selection stays on
        # rows no run has seen).
        evict = winner & (slot < min(self.seen, m))
        old = self.holdout[xp.where(evict, slot, m)]  # [b, d] gathered before the write; row m is scratch
        self.holdout[xp.where(winner, slot, m)] = x
        self.seen += b
        xm = xp.where(winner[:, None], xp.where(evict[:, None], old, 0.0), x)  # [b, d] the rows fed to runs
        keep = xp.cast(~winner | evict, x.dtype)  # [b]: 0 where a winner filled an empty slot
        fed2 = (xm * xm).sum(-1)
        weight = None
        if cfg.clip_ratio is not None:
            # mean ‖a‖² of the rows fed before this block (the step scale s before any)
            mean = xp.where(self.fed > 0, self.fro2 / xp.clamp_min(self.fed, 1.0), self.scale)
            cap = xp.cast(mean * cfg.clip_ratio, x.dtype)
            heavy = fed2 > cap
            w1 = xp.where(heavy, cap / xp.clamp_min(fed2, cap), 1.0)  # [b]
            self.clipped = self.clipped + xp.cast((1.0 - w1) * fed2, "float64").sum()
            self.clipped_rows = self.clipped_rows + heavy.sum()
            weight = w1[None, :].expand(len(self.steps), b) if xp.torch else np.broadcast_to(w1[None, :], (len(self.steps), b))
            fed2w = fed2 * w1
        else:
            fed2w = fed2
        self.fro2 = self.fro2 + xp.cast(fed2, "float64").sum()
        self.fed = self.fed + xp.cast(keep, "float64").sum()
        load = self.eta[:, None] * fed2w[None, :]  # [G, b]
        over = load > cfg.tau
        self.failed = self.failed | over.any(-1)
        self.heavy_rows = self.heavy_rows + over.sum(-1)
        self.max_load = xp.maximum(self.max_load, xp.amax(load, -1))
        self.v = oja_block(xp, self.v, xm, self.eta, weight)
        self.avg_cur = self.avg_cur + self.v
        self.blocks_cur += 1
        if self.blocks_cur >= max(self.blocks_before, 1):
            self.avg_prev, self.avg_cur = self.avg_cur, self.avg_prev * 0
            self.blocks_before, self.blocks_cur = self.blocks_before + self.blocks_cur, 0
            # Epoch end (geometric: log2 of the blocks, ever): keep the iterate if it beats the checkpoint
            # on the held-back sample as it is now. [G] comparisons, one [f, d] × [d, 2G] product.
            f = min(self.seen, cfg.holdout)
            r = self.holdout[:f]
            rq = ((r @ xp.cat([self.v, self.best]).T) ** 2).sum(0)  # [2G]
            g = len(self.steps)
            better = rq[:g] >= rq[g:]
            self.best = xp.where(better[:, None], self.v, self.best)

    # -- read out --
    def candidates(self):
        """[3G, d] unit rows: each run's last iterate (rows 0..G−1), its tail average (rows G..2G−1; the
        last iterate again before the first block), then its checkpoint (rows 2G..3G−1)."""
        xp = self.xp
        avg = self.avg_prev + self.avg_cur
        norm = (avg * avg).sum(-1) ** 0.5
        good = xp.isfinite(norm) & (norm > 0)
        avg = xp.where(good[:, None], avg / xp.where(good, norm, 1.0)[:, None], self.v)
        return xp.cat([self.v, avg, self.best])

    def rayleigh(self):
        """[3G] Rayleigh quotients ‖R u‖²/|R| of the candidates on the held-back sample (backend array)."""
        f = min(self.seen, self.config.holdout)
        r = self.holdout[:f]
        return ((r @ self.candidates().T) ** 2).sum(0) / max(f, 1)

    def _pick(self) -> int:
        xp = self.xp
        rq = self.rayleigh()
        ok = xp.cat([~self.failed, ~self.failed, ~self.failed]) & xp.isfinite(rq)
        if not bool(xp.item(ok.any())):
            raise SketchFailure(
                f"OjaGrid: every η failed (a row had η‖a‖² > tau={self.config.tau}); the smallest step's "
                f"largest load was {float(xp.item(self.max_load[0])):.3g}: lower grid_min or use HeavyLight, "
                "which keeps heavy rows exactly")
        score = xp.where(ok, rq, -1.0)
        return int(xp.item(score.argmax()))

    def selected(self) -> int:
        """Index g of the run whose last iterate or tail average `estimate` returns: the candidate with the
        largest held-back Rayleigh quotient among runs that did not fail. Raises SketchFailure when every
        run failed."""
        return self._pick() % self.config.grid_size

    def estimate(self):
        """Unit top-eigenvector estimate [d] (backend array, largest entry positive)."""
        if self.seen == 0:
            raise SketchFailure("OjaGrid: no rows yet")
        return _sign_fix(self.xp, self.candidates()[self._pick()])

    def status(self) -> dict:
        xp = self.xp
        host = xp.to_host
        try:
            pick = self._pick() if self.seen else None
        except SketchFailure:
            pick = None
        g = self.config.grid_size
        selected = None if pick is None else pick % g
        failed = host(self.failed).tolist()
        # degraded: a larger η than the one returned was rejected for a heavy row, so the returned run may
        # simply be too slow to have converged (the case HeavyLight exists for)
        degraded = selected is None and any(failed) or selected is not None and any(failed[selected + 1:])
        return {
            "seen": self.seen, "scale": self.scale, "steps": self.config.steps.tolist(), "selected": selected,
            "selected_average": None if pick is None else g <= pick < 2 * g,
            "selected_candidate": None if pick is None else ("last", "average", "checkpoint")[pick // g],
            "degraded": bool(degraded),
            "failed": failed, "heavy_rows": host(self.heavy_rows).tolist(),
            "max_load": host(self.max_load).astype(float).tolist(),
            "clipped_rows": int(xp.item(self.clipped_rows)),
            "clipped_energy": float(xp.item(self.clipped)),
            "fed_energy": float(xp.item(self.fro2)),
            "rayleigh": host(self.rayleigh()).astype(float).tolist(),
            "nonfinite_rows": int(xp.item(self.nonfinite)),
        }

    def memory_floats(self) -> int:
        cfg = self.config
        # run iterates, this and the previous epoch's tail sums, the checkpoints, and the sample (+1 scratch row)
        return (4 * cfg.grid_size + cfg.holdout + 1) * cfg.dim

    # -- state --
    def state_dict(self) -> dict:
        xp = self.xp
        f = min(self.seen, self.config.holdout)
        return {
            "kind": self.kind, "version": STATE_VERSION, "config": asdict(self.config),
            "seen": self.seen, "scale": self.scale, "v": xp.to_host(self.v), "holdout": xp.to_host(self.holdout[:f]),
            "failed": xp.to_host(self.failed), "heavy_rows": xp.to_host(self.heavy_rows),
            "max_load": xp.to_host(self.max_load), "nonfinite": int(xp.item(self.nonfinite)),
            "clipped": float(xp.item(self.clipped)), "clipped_rows": int(xp.item(self.clipped_rows)),
            "fro2": float(xp.item(self.fro2)), "fed": float(xp.item(self.fed)),
            "avg_cur": xp.to_host(self.avg_cur), "avg_prev": xp.to_host(self.avg_prev),
            "blocks_cur": self.blocks_cur, "blocks_before": self.blocks_before, "best": xp.to_host(self.best),
        }

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "OjaGrid":
        _check_state(state, cls.kind)
        sk = cls(config=OjaGridConfig(**state["config"]), device=device)
        xp, cfg = sk.xp, sk.config
        sk.seen, sk.scale = int(state["seen"]), state["scale"]
        sk.v = xp.from_host(state["v"], cfg.dtype)
        f = state["holdout"].shape[0]
        sk.holdout[:f] = xp.from_host(state["holdout"], cfg.dtype)
        sk.failed = xp.from_host(state["failed"], "bool")
        sk.heavy_rows = xp.from_host(state["heavy_rows"], "int64")
        sk.max_load = xp.from_host(state["max_load"], cfg.dtype)
        sk.nonfinite = xp.from_host(np.int64(state["nonfinite"]), "int64")
        sk.clipped = xp.from_host(np.float64(state["clipped"]), "float64")
        sk.clipped_rows = xp.from_host(np.int64(state["clipped_rows"]), "int64")
        sk.fro2 = xp.from_host(np.float64(state["fro2"]), "float64")
        sk.fed = xp.from_host(np.float64(state["fed"]), "float64")
        sk.avg_cur, sk.avg_prev = xp.from_host(state["avg_cur"], cfg.dtype), xp.from_host(state["avg_prev"], cfg.dtype)
        sk.blocks_cur, sk.blocks_before = int(state["blocks_cur"]), int(state["blocks_before"])
        sk.best = xp.from_host(state["best"], cfg.dtype)
        if sk.scale is not None:
            sk.eta = sk.steps / sk.scale
        return sk

    def merge(self, other):
        raise TypeError("OjaGrid is not mergeable: the Oja products of two halves do not combine "
                        "into the product over the whole stream; merge FrequentDirections instead")


# ---- (2) HeavyLight: exact heavy rows + block power steps over shuffled light rows ----

@dataclass(frozen=True)
class HeavyLightConfig:
    dim: int
    block: int = 8               # k columns of the power block
    shuffle: int = 1024          # S rows in the shuffle buffer (0: off)
    heavy_capacity: int = 64     # H rows kept exactly at most
    heavy_factor: float | None = None  # heavy iff ‖a‖² ≥ ‖A‖_F² / heavy_factor; None: d·ln²(d)
    epoch0: int | None = None    # rows in the first power epoch (doubling after); None: max(4d, 256)
    history: bool = True         # power steps use every past light row (projected), not only the epoch's
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        _check_positive_int("dim", self.dim)
        _check_positive_int("block", self.block)
        if self.block > self.dim:
            raise ValueError(f"block: expected 1 <= block <= dim={self.dim}, got {self.block}")
        _check_positive_int("shuffle", self.shuffle, low=0)
        _check_positive_int("heavy_capacity", self.heavy_capacity, low=0)
        if self.heavy_factor is not None and not (np.isfinite(self.heavy_factor) and self.heavy_factor >= 1):
            raise ValueError(f"heavy_factor: expected None or a finite divisor >= 1, got {self.heavy_factor!r}")
        if self.epoch0 is not None:
            _check_positive_int("epoch0", self.epoch0)
        _check_dtype(self.dtype)

    @property
    def divisor(self) -> float:
        if self.heavy_factor is not None:
            return float(self.heavy_factor)
        return max(self.dim * math.log(max(self.dim, 3)) ** 2, 1.0)

    @property
    def first_epoch(self) -> int:
        return self.epoch0 if self.epoch0 is not None else max(4 * self.dim, 256)


class HeavyLight:
    """Heavy rows kept exactly + block power steps over the (shuffled) light rows.

    Guarantee relied on (Kacham–Woodruff, random order): a row is heavy when ‖a‖² ≥ ‖A‖_F²/(d·ln²d)
    (running ‖A‖_F²); fewer than d·ln²d rows can be heavy, and the sketch keeps the H heaviest of them
    exactly (rows that stop being heavy as ‖A‖_F² grows, or that do not fit, are demoted to the light
    path; `status()["overflow"]` counts those still heavy when dropped once the stream is longer than
    d·ln²d rows — 0 means the bound held). Heavy rows are applied exactly at every power step, so a
    burst of them can never be averaged away or overshoot a step size.

    `history=False` is their light step: in random order the light rows of an epoch are a uniform
    sample of the light stream, so W = (N_light/N_epoch)·Σ_epoch a aᵀ V + Σ_heavy a aᵀ V is an unbiased
    estimate of AᵀA V; one block power step V ← orth(W) per epoch, epochs doubling so the last one is
    about half the stream and an unknown n needs no tuning; correlation 1 − O(1/√R) in their analysis.
    `history=True` (default) keeps every past epoch instead of only the last: the light part is
    H_e = Σ_past a aᵀ V, carried onto each new basis as H ← H·(V_oldᵀ V_new). That is exact for the
    part of V_new inside span(V_old) and drops Σ_past a aᵀ (I − V_old V_oldᵀ) V_new, which vanishes as
    the block converges (V_new − V_old → 0); outside the paper's analysis, but the step then uses all
    light rows, not a half-stream sample, and a stream sorted by its top component (bench `sorted`)
    no longer defeats it.

    Token streams are autocorrelated (a request's rows are alike), so rows first pass a shuffle
    buffer of S rows (each incoming row swaps with a uniformly chosen buffered row): runs shorter than
    S look random to the power steps. Buffered rows are in hand and enter `estimate` exactly.

    Memory: shuffle [S, d] + heavy [H, d] + V, W, history and previous V/W [d, k] each.
    Not mergeable here (each sketch's power iterate is tied to its own epochs).
    """

    kind = "heavy_light"

    def __init__(self, dim: int | None = None, *, config: HeavyLightConfig | None = None, device=None, **kwargs):
        if config is None:
            config = HeavyLightConfig(dim=dim, **kwargs)
        elif dim is not None or kwargs:
            raise ValueError("config: pass either config= or dim/keyword arguments, not both")
        self.config = cfg = config
        self.xp = xp = _ops(device)
        d, k = cfg.dim, cfg.block
        v0 = np.linalg.qr(np.random.default_rng(cfg.seed).standard_normal((d, k)))[0]
        self.basis = xp.from_host(v0, cfg.dtype)  # V [d, k]
        self.acc = xp.zeros((d, k), cfg.dtype)  # Σ_epoch light a aᵀ V
        self.hist = xp.zeros((d, k), cfg.dtype)  # history mode: Σ_past light a aᵀ, carried onto the current V
        self.prev_basis = None  # epoch mode: V and scaled light W of the last finished epoch
        self.prev_light = None
        self.buffer = xp.zeros((cfg.shuffle, d), cfg.dtype)
        self.buffered = 0
        self.heavy = xp.zeros((cfg.heavy_capacity, d), cfg.dtype)
        self.heavy_norm2 = xp.zeros((cfg.heavy_capacity,), "float64")  # 0 marks an empty slot
        self.fro2 = xp.zeros((), "float64")  # ‖A‖_F² of every row offered
        self.light_total = xp.zeros((), "float64")  # light rows processed, all epochs
        self.light_epoch = xp.zeros((), "float64")  # light rows processed, this epoch
        self.overflow = xp.zeros((), "int64")
        self.nonfinite = xp.zeros((), "int64")
        self.seen = 0  # rows offered
        self.processed = 0  # rows out of the shuffle buffer
        self.epoch = 0
        self.epoch_start = 0
        self.epoch_len = cfg.first_epoch
        self.shuffles = 0

    def update(self, rows) -> None:
        cfg, xp = self.config, self.xp
        x, finite, n2 = _prepare_rows(xp, rows, cfg.dim, cfg.dtype)
        self.nonfinite = self.nonfinite + (~finite).sum()
        n = x.shape[0]
        if n == 0:
            return
        self.fro2 = self.fro2 + xp.cast(n2, "float64").sum()
        self.seen += n
        chunk = max(cfg.shuffle, 256)
        for start in range(0, n, chunk):
            out = self._shuffle(x[start:start + chunk])
            if out is not None and out.shape[0]:
                self._process(out)

    def _shuffle(self, x):
        # x: [b, d], b ≤ max(S, 256) -> rows leaving the buffer, same count once it is full
        cfg, xp = self.config, self.xp
        s = cfg.shuffle
        if s == 0:
            return x
        if self.buffered < s:  # filling: nothing leaves yet
            take = min(s - self.buffered, x.shape[0])
            self.buffer[self.buffered:self.buffered + take] = x[:take]
            self.buffered += take
            x = x[take:]
        out = []
        for start in range(0, x.shape[0], s):  # swap with b distinct random slots
            part = x[start:start + s]
            keys = _uniform(xp, xp.arange(self.shuffles * s, s), cfg.seed, 3)
            self.shuffles += 1
            slots = xp.argsort_desc(keys)[:part.shape[0]]
            out.append(xp.copy(self.buffer[slots]))
            self.buffer[slots] = part
        return xp.cat(out) if out else None

    def _process(self, x):
        # split at epoch ends (host arithmetic on counts)
        while x.shape[0]:
            room = self.epoch_start + self.epoch_len - self.processed
            part, x = x[:room], x[room:]
            self._accumulate(part)
            self.processed += part.shape[0]
            if self.processed == self.epoch_start + self.epoch_len:
                self._power_step()

    def _accumulate(self, x):
        # x: [b, d] rows in (shuffled) stream order
        cfg, xp = self.config, self.xp
        h = cfg.heavy_capacity
        n2 = xp.cast((x * x).sum(-1), "float64")  # [b]
        theta = self.fro2 / cfg.divisor
        old = self.heavy_norm2  # [H]
        cand = xp.cat([xp.where(old >= theta, old, 0.0), xp.where(n2 >= theta, n2, 0.0)])  # [H + b]
        live = xp.cat([old > 0, n2 >= 0])  # entries that hold a row
        order = xp.argsort_desc(cand)[:h]  # the H heaviest candidates stay (stable: older first on ties)
        kept = xp.zeros((h + x.shape[0],), "bool")
        kept[order] = cand[order] > 0
        light = xp.cast(live & ~kept, x.dtype)  # [H + b]: demoted, dropped and light rows feed the power step
        # Σ_light a aᵀ V without concatenating or masking the rows (each would be one more pass over [b, d])
        self.acc = (self.acc + x.T @ ((x @ self.basis) * light[h:, None])
                    + self.heavy.T @ ((self.heavy @ self.basis) * light[:h, None]))
        from_old = order < h  # new buffer: H rows gathered from the old buffer or from x
        pick_old = self.heavy[xp.where(from_old, order, 0)] if h else self.heavy
        pick_new = x[xp.where(from_old, 0, order - h)] if h else self.heavy
        keep = kept[order]
        self.heavy = (xp.where((from_old & keep)[:, None], pick_old, 0.0)
                      + xp.where((~from_old & keep)[:, None], pick_new, 0.0))
        self.heavy_norm2 = xp.where(keep, cand[order], 0.0)
        if self.seen > cfg.divisor:
            # Before the stream is d·ln²d rows long an average row is itself "heavy" by the definition
            # and the buffer just keeps the H largest; only after that is a dropped heavy row an overflow.
            self.overflow = self.overflow + ((cand > 0) & ~kept).sum()
        nl = xp.cast(light.sum(), "float64")
        self.light_epoch = self.light_epoch + nl
        self.light_total = self.light_total + nl

    def _heavy_apply(self, basis):
        return self.heavy.T @ (self.heavy @ basis)

    def _light_scaled(self):
        scale = self.light_total / self.xp.clamp_min(self.light_epoch, 1.0)
        return self.acc * self.xp.cast(scale, self.acc.dtype)

    def _power_step(self):
        if self.config.history:
            light = self.hist + self.acc  # ≈ Σ_all light a aᵀ V (past epochs carried over, see class doc)
            new = _orth(self.xp, light + self._heavy_apply(self.basis))
            self.hist = light @ (self.basis.T @ new)
            self.basis = new
        else:
            w = self._light_scaled() + self._heavy_apply(self.basis)
            self.prev_basis, self.prev_light = self.basis, self._light_scaled()
            self.basis = _orth(self.xp, w)
        self.acc = self.acc * 0
        self.light_epoch = self.light_epoch * 0
        self.epoch += 1
        self.epoch_start = self.processed
        self.epoch_len *= 2

    def estimate(self, k: int | None = None):
        """Top eigenvector [d] (or the top k as orthonormal columns [d, k]) from one more power step
        W = light part + Σ_heavy a aᵀ V + Σ_buffered a aᵀ V (the last two exact): the light part is the
        carried history plus this epoch (history=True), else the scaled current epoch, or the last
        finished one while the current has seen fewer than a quarter of its rows. Returns the leading
        left singular vector(s) of W [d, k]."""
        xp, cfg = self.xp, self.config
        if k is not None and not (1 <= k <= cfg.block):
            raise ValueError(f"k: expected None or 1 <= k <= block={cfg.block}, got {k!r}")
        if self.seen == 0:
            raise SketchFailure("HeavyLight: no rows yet")
        current = self.processed - self.epoch_start
        if cfg.history:
            basis, light = self.basis, self.hist + self.acc
        elif self.prev_basis is not None and current < self.epoch_len // 4:
            basis, light = self.prev_basis, self.prev_light  # previous epoch had 2× the rows seen so far
        else:
            basis, light = self.basis, self._light_scaled()
        buf = self.buffer[:self.buffered]
        w = light + self._heavy_apply(basis) + buf.T @ (buf @ basis)  # [d, k]
        gram = xp.cast(w.T @ w, "float64")
        evals, evecs = xp.eigh(gram)  # ascending
        kk = 1 if k is None else k
        c = xp.cast(xp.flip(evecs[:, -kk:], 1), w.dtype)  # leading first
        u = w @ c
        u = _orth(xp, u) if kk > 1 else u / ((u * u).sum() ** 0.5)
        u = _sign_fix(xp, u)
        return u[:, 0] if k is None else u

    def status(self) -> dict:
        xp = self.xp
        return {
            "seen": self.seen, "processed": self.processed, "buffered": self.buffered, "epoch": self.epoch,
            "heavy_rows": int(xp.item((self.heavy_norm2 > 0).sum())), "overflow": int(xp.item(self.overflow)),
            "heavy_threshold": float(xp.item(self.fro2)) / self.config.divisor,
            "nonfinite_rows": int(xp.item(self.nonfinite)),
        }

    def heavy_rows(self):
        """The rows kept exactly [h, d] (heaviest first) and their squared norms [h] (backend arrays)."""
        n = int(self.xp.item((self.heavy_norm2 > 0).sum()))
        return self.heavy[:n], self.heavy_norm2[:n]

    def memory_floats(self) -> int:
        cfg = self.config
        return (cfg.shuffle + cfg.heavy_capacity + 5 * cfg.block) * cfg.dim

    def state_dict(self) -> dict:
        xp = self.xp
        host = xp.to_host
        return {
            "kind": self.kind, "version": STATE_VERSION, "config": asdict(self.config),
            "basis": host(self.basis), "acc": host(self.acc), "hist": host(self.hist),
            "prev_basis": None if self.prev_basis is None else host(self.prev_basis),
            "prev_light": None if self.prev_light is None else host(self.prev_light),
            "buffer": host(self.buffer[:self.buffered]), "heavy": host(self.heavy), "heavy_norm2": host(self.heavy_norm2),
            "fro2": float(xp.item(self.fro2)), "light_total": float(xp.item(self.light_total)),
            "light_epoch": float(xp.item(self.light_epoch)), "overflow": int(xp.item(self.overflow)),
            "nonfinite": int(xp.item(self.nonfinite)),
            "counters": {f: getattr(self, f) for f in ("seen", "processed", "buffered", "epoch", "epoch_start",
                                                          "epoch_len", "shuffles")},
        }

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "HeavyLight":
        _check_state(state, cls.kind)
        sk = cls(config=HeavyLightConfig(**state["config"]), device=device)
        xp, dt = sk.xp, sk.config.dtype
        for f, v in state["counters"].items():
            setattr(sk, f, int(v))
        sk.basis, sk.acc = xp.from_host(state["basis"], dt), xp.from_host(state["acc"], dt)
        sk.hist = xp.from_host(state["hist"], dt)
        if state["prev_basis"] is not None:
            sk.prev_basis, sk.prev_light = xp.from_host(state["prev_basis"], dt), xp.from_host(state["prev_light"], dt)
        sk.buffer[:sk.buffered] = xp.from_host(state["buffer"], dt)
        sk.heavy, sk.heavy_norm2 = xp.from_host(state["heavy"], dt), xp.from_host(state["heavy_norm2"], "float64")
        for f in ("fro2", "light_total", "light_epoch"):
            setattr(sk, f, xp.from_host(np.float64(state[f]), "float64"))
        sk.overflow = xp.from_host(np.int64(state["overflow"]), "int64")
        sk.nonfinite = xp.from_host(np.int64(state["nonfinite"]), "int64")
        return sk

    def merge(self, other):
        raise TypeError("HeavyLight is not mergeable: each sketch's power iterate belongs to its own epochs; "
                        "merge FrequentDirections instead")


# ---- (2b) StackedPower: HeavyLight's light path on L streams at once (the live tap's) ----

def _orth_batched(xp, w):
    """w: [L, d, k] -> orthonormal bases [L, d, k], diag(R) ≥ 0 (the batched `_orth`)."""
    q, r = xp.qr(w)
    d = r.diagonal(dim1=-2, dim2=-1) if xp.torch else np.diagonal(r, axis1=-2, axis2=-1)
    s = xp.where(d < 0, -1.0, 1.0)
    return q * xp.cast(s, q.dtype)[..., None, :]


def leading_directions(w, k: int, xp=None):
    """w: [d, kb] (a block power product AᵀA·V; numpy unless xp says otherwise) -> its k leading left
    singular vectors [d, k], unit columns, signs fixed (largest entry positive): the Rayleigh–Ritz step of
    the block power method. Raises SketchFailure for a zero or non-finite product (no rows, or only bad ones)."""
    xp = _NumpyOps() if xp is None else xp
    if not (1 <= k <= w.shape[1]):
        raise ValueError(f"k: expected 1 <= k <= {w.shape[1]}, got {k!r}")
    total = float(xp.item((w * w).sum()))
    if not (math.isfinite(total) and total > 0):
        raise SketchFailure(f"the block product is {'zero' if total == 0 else 'not finite'}: no usable rows")
    gram = xp.cast(w.T @ w, "float64")
    _, evecs = xp.eigh(gram)  # ascending
    c = xp.cast(xp.flip(evecs[:, -k:], 1), w.dtype)  # leading first
    u = w @ c
    u = _orth(xp, u) if k > 1 else u / ((u * u).sum() ** 0.5)
    return _sign_fix(xp, u)


class StackedPower:
    """The block power method with history on L independent streams at once, batched: per update two
    batched products ([L, n, d]·[L, d, k] and back), a power step (batched QR) only at epoch ends.

    Per stream it is exactly `HeavyLight(history=True, shuffle=0, heavy_capacity=0)` (tests compare the
    two): V ← orth(H + Σ_epoch a aᵀ V) at the end of epochs of epoch0, 2·epoch0, ... rows, the past carried
    as H ← (H + Σ_epoch a aᵀ V)·VᵀV_new. What it leaves out, for the per-step budget of a live tap:
    the shuffle buffer (the history keeps every row, so order matters only through the dropped part
    Σ_past a aᵀ(I − V Vᵀ)V_new, which vanishes as V converges) and the exact heavy rows. `restart()`
    starts a new stream segment from the current basis (warm start: a window of a stationary stream
    then starts converged). Memory: 3 [L, d, k] blocks. Rows with a non-finite entry are zeroed and
    counted. `update` reads nothing back to the host from a GPU (on the host it checks for bad rows).
    """

    def __init__(self, streams: int, dim: int, block: int = 8, epoch0: int = 256, dtype: str = "float32",
                 seeds=None, device=None):
        _check_positive_int("streams", streams)
        _check_positive_int("dim", dim)
        _check_positive_int("block", block)
        _check_positive_int("epoch0", epoch0)
        if block > dim:
            raise ValueError(f"block: expected 1 <= block <= dim={dim}, got {block}")
        _check_dtype(dtype)
        seeds = list(range(streams)) if seeds is None else list(seeds)
        if len(seeds) != streams:
            raise ValueError(f"seeds: expected {streams} seeds, got {len(seeds)}")
        self.streams, self.dim, self.block, self.epoch0, self.dtype = streams, dim, block, epoch0, dtype
        self.xp = xp = _ops(device)
        v0 = np.stack([np.linalg.qr(np.random.default_rng(s).standard_normal((dim, block)))[0] for s in seeds])
        # Stored transposed, [L, k, d] contiguous: the products then run as [k, d]·[d, n] and [k, n]·[n, d],
        # 3-5x faster on CPU BLAS than the skinny [n, d]·[d, k] and [d, n]·[n, k] (measured, torch, 1 thread).
        self.basis_t = xp.from_host(np.ascontiguousarray(v0.transpose(0, 2, 1)), dtype)  # Vᵀ [L, k, d]
        self.nonfinite = xp.zeros((streams,), "int64")
        self.restart()

    @property
    def basis(self):
        """V [L, d, k] (a transposed view)."""
        return self.basis_t.swapaxes(-1, -2)

    def restart(self, basis_t=None) -> None:
        """A new segment: zero the accumulators and epochs, keep (or set, as Vᵀ [L, k, d]) the basis."""
        xp = self.xp
        if basis_t is not None:
            self.basis_t = basis_t
        self.acc_t = xp.zeros((self.streams, self.block, self.dim), self.dtype)  # (Σ_epoch a aᵀ V)ᵀ
        self.hist_t = xp.zeros((self.streams, self.block, self.dim), self.dtype)  # Hᵀ
        self.rows = 0  # rows of this segment, per stream
        self.epoch_start, self.epoch_len, self.epochs = 0, self.epoch0, 0

    def update(self, x) -> None:
        """x: [L, n, d] (numpy or torch; a [n, d] block is taken as L = 1) — row i of stream l is x[l, i]."""
        xp = self.xp
        shape = tuple(x.shape)
        if len(shape) == 2 and self.streams == 1:
            x = x[None]
            shape = tuple(x.shape)
        if len(shape) != 3 or shape[0] != self.streams or shape[2] != self.dim:
            raise ValueError(f"x: expected [{self.streams}, n, {self.dim}], got {shape}")
        x = xp.rows(x, xp.dtype(self.dtype))
        # A non-finite entry anywhere in a row makes every entry of its projection non-finite, so the
        # [L, n, k] projection finds bad rows without a pass over [L, n, d]. On a GPU they are zeroed
        # unconditionally (no host read); on the host only when there are some (no copy otherwise).
        always = xp.torch and xp.device.type != "cpu"
        while x.shape[1]:
            room = self.epoch_start + self.epoch_len - self.rows
            part, x = x[:, :room], x[:, room:]
            p = self.basis_t @ part.swapaxes(-1, -2)  # (X V)ᵀ [L, k, n]
            bad = ~xp.isfinite(p).all(-2)  # [L, n]
            if always or bool(bad.any()):
                part = xp.where(bad[..., None], 0.0, part)
                p = xp.where(bad[:, None, :], 0.0, p)
                self.nonfinite = self.nonfinite + bad.sum(-1)
            self.acc_t = self.acc_t + p @ part  # (Xᵀ X V)ᵀ
            self.rows += part.shape[1]
            if self.rows == self.epoch_start + self.epoch_len:
                self._power_step()

    def _power_step(self) -> None:
        light_t = self.hist_t + self.acc_t
        new_t = _orth_batched(self.xp, light_t.swapaxes(-1, -2)).swapaxes(-1, -2)  # V_newᵀ
        self.hist_t = (new_t @ self.basis_t.swapaxes(-1, -2)) @ light_t  # (H·VᵀV_new)ᵀ
        self.basis_t = new_t.contiguous() if self.xp.torch else np.ascontiguousarray(new_t)
        self.acc_t = self.acc_t * 0
        self.epochs += 1
        self.epoch_start = self.rows
        self.epoch_len *= 2

    def light(self):
        """[L, d, k]: H + Σ_epoch a aᵀ V, the block product `leading_directions` reads (a new array)."""
        return (self.hist_t + self.acc_t).swapaxes(-1, -2)

    def finish(self):
        """End the segment: returns its block product [L, d, k] (`light()`) and restarts from orth of it
        (one more power step, batched); a stream whose product is zero or not finite keeps its basis."""
        xp = self.xp
        w = self.light()
        new_t = _orth_batched(xp, w).swapaxes(-1, -2)
        ok = xp.isfinite(new_t).all(-1).all(-1) & ((w * w).sum(-1).sum(-1) > 0)  # [L], no host read
        new_t = xp.where(ok[:, None, None], new_t, self.basis_t)
        self.restart(new_t.contiguous() if xp.torch else np.ascontiguousarray(new_t))
        return w

    def memory_floats(self) -> int:
        return 3 * self.streams * self.dim * self.block


# ---- (3) Frequent Directions ----

@dataclass(frozen=True)
class FDConfig:
    dim: int
    ell: int = 8          # sketch rows kept after each shrink (ℓ − 1 non-zero)
    buffer: int | None = None  # rows held before a shrink; None: 2ℓ. Larger = fewer shrinks (on CUDA each
                               # shrink's eigh reads its status back to the host), same bound
    dtype: str = "float32"

    def __post_init__(self):
        _check_positive_int("dim", self.dim)
        _check_positive_int("ell", self.ell, low=2)
        if self.buffer is not None:
            _check_positive_int("buffer", self.buffer, low=self.ell + 1)
        _check_dtype(self.dtype)

    @property
    def rows(self) -> int:
        return self.buffer if self.buffer is not None else 2 * self.ell


class FrequentDirections:
    """Frequent Directions with a 2ℓ-row buffer (Ghashami, Liberty, Phillips, Woodruff 2016).

    A larger `buffer` m > ℓ keeps the same bound (each shrink by δ = σ_ℓ² removes at least ℓ·δ of
    ‖B‖_F², which is all the proof uses) with fewer shrinks: on CUDA each shrink's eigh checks its
    status on the host, so a tap should set m ≈ ℓ + rows per step (one shrink per step).

    Guarantee (deterministic, any order): for every unit x and every k < ℓ,
    0 ≤ ‖Ax‖² − ‖Bx‖² ≤ Δ ≤ ‖A − A_k‖_F²/(ℓ − k), where Δ = Σ of the shrink amounts δ (`delta()`),
    so the top-k right singular vectors of B span a subspace whose AᵀA-energy is within Δ of optimal.
    Mergeable (Agarwal et al. 2013): stacking two sketches and shrinking keeps the same bound for the
    union of the two streams, with Δ = Δ₁ + Δ₂ + the merge's own shrinks.
    Each shrink: eigen-decomposition of the [m, m] Gram in float64, δ = σ_ℓ², rows scaled by
    √(σ_i² − δ)/σ_i; amortised O(m²·d/(m − ℓ)) per row, O(ℓ·d) at m = 2ℓ. Memory: [m, d] floats.
    """

    kind = "frequent_directions"

    def __init__(self, dim: int | None = None, *, config: FDConfig | None = None, device=None, **kwargs):
        if config is None:
            config = FDConfig(dim=dim, **kwargs)
        elif dim is not None or kwargs:
            raise ValueError("config: pass either config= or dim/keyword arguments, not both")
        self.config = cfg = config
        self.xp = xp = _ops(device)
        self.rows = xp.zeros((cfg.rows, cfg.dim), cfg.dtype)
        self.filled = 0
        self.shrink_total = xp.zeros((), "float64")  # Δ
        self.nonfinite = xp.zeros((), "int64")
        self.seen = 0

    def update(self, rows) -> None:
        cfg, xp = self.config, self.xp
        x, finite, _ = _prepare_rows(xp, rows, cfg.dim, cfg.dtype)
        self.nonfinite = self.nonfinite + (~finite).sum()
        self.seen += x.shape[0]
        self._insert(x)

    def _insert(self, x):
        cap = self.rows.shape[0]
        while x.shape[0]:
            take = min(cap - self.filled, x.shape[0])
            self.rows[self.filled:self.filled + take] = x[:take]
            self.filled += take
            x = x[take:]
            if self.filled == cap:
                self._shrink()

    def _shrink(self):
        xp, ell = self.xp, self.config.ell
        c = self.rows  # [m, d], m = buffer rows
        g = xp.cast(c, "float64") @ xp.cast(c, "float64").T
        s2, u = xp.eigh(g)  # ascending
        s2, u = xp.flip(s2, 0), xp.flip(u, 1)
        s2 = xp.where(s2 > 0, s2, 0.0)
        delta = s2[ell - 1]
        keep = s2[:ell - 1]
        coef = xp.where(keep > 0, ((keep - delta) / xp.where(keep > 0, keep, 1.0)) ** 0.5, 0.0)  # √(σ²−δ)/σ
        new = xp.cast((u[:, :ell - 1] * coef[None, :]).T, c.dtype) @ c  # [ℓ−1, d]
        self.rows[:ell - 1] = new
        self.rows[ell - 1:] = 0
        self.filled = ell - 1
        self.shrink_total = self.shrink_total + delta

    def sketch(self):
        """The current sketch rows B [f, d] (f ≤ 2ℓ): ‖Bx‖² ≤ ‖Ax‖² ≤ ‖Bx‖² + Δ."""
        return self.rows[:self.filled]

    def delta(self) -> float:
        """Δ: the exact a-posteriori bound on ‖Ax‖² − ‖Bx‖² (sum of shrinks)."""
        return float(self.xp.item(self.shrink_total))

    def estimate(self, k: int | None = None):
        """Top right singular vector [d] of the sketch (k=None), or the top k as columns [d, k]."""
        xp, ell = self.xp, self.config.ell
        if k is not None and not (1 <= k < ell):
            raise ValueError(f"k: expected None or 1 <= k < ell={ell}, got {k!r}")
        kk = 1 if k is None else k
        if self.filled < kk:
            raise SketchFailure(f"FrequentDirections: {self.filled} sketch rows, fewer than k={kk}")
        b = self.rows[:self.filled]
        s2, u = xp.eigh(xp.cast(b, "float64") @ xp.cast(b, "float64").T)
        cols = xp.flip(u[:, -kk:], 1)
        vecs = b.T @ xp.cast(cols, b.dtype)  # [d, kk], column norms σ_i
        vecs = _orth(xp, vecs)
        vecs = _sign_fix(xp, vecs)
        return vecs[:, 0] if k is None else vecs

    def merge(self, other: "FrequentDirections") -> "FrequentDirections":
        """Fold `other` (same dim and ℓ) into this sketch; the bound then covers both streams."""
        if not isinstance(other, FrequentDirections):
            raise TypeError(f"other: expected a FrequentDirections, got {type(other).__name__}")
        if (other.config.dim, other.config.ell) != (self.config.dim, self.config.ell):
            raise ValueError(f"other: expected dim={self.config.dim}, ell={self.config.ell}, "
                             f"got dim={other.config.dim}, ell={other.config.ell}")
        rows = self.xp.rows(other.sketch(), self.xp.dtype(self.config.dtype))
        self.shrink_total = self.shrink_total + other.delta()
        self.seen += other.seen
        self.nonfinite = self.nonfinite + int(other.xp.item(other.nonfinite))
        self._insert(rows)
        return self

    def status(self) -> dict:
        return {"seen": self.seen, "filled": self.filled, "delta": self.delta(),
                "nonfinite_rows": int(self.xp.item(self.nonfinite))}

    def memory_floats(self) -> int:
        return self.config.rows * self.config.dim

    def state_dict(self) -> dict:
        xp = self.xp
        return {"kind": self.kind, "version": STATE_VERSION, "config": asdict(self.config),
                "rows": xp.to_host(self.sketch()), "delta": self.delta(), "seen": self.seen,
                "nonfinite": int(xp.item(self.nonfinite))}

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "FrequentDirections":
        _check_state(state, cls.kind)
        sk = cls(config=FDConfig(**state["config"]), device=device)
        xp = sk.xp
        rows = state["rows"]
        sk.rows[:rows.shape[0]] = xp.from_host(rows, sk.config.dtype)
        sk.filled, sk.seen = rows.shape[0], int(state["seen"])
        sk.shrink_total = xp.from_host(np.float64(state["delta"]), "float64")
        sk.nonfinite = xp.from_host(np.int64(state["nonfinite"]), "int64")
        return sk


_KINDS = {c.kind: c for c in (OjaGrid, HeavyLight, FrequentDirections)}


def from_state_dict(state: dict, device=None):
    """Rebuild whichever sketch wrote `state` (numpy when device is None, else torch on `device`)."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in _KINDS:
        raise ValueError(f"state: expected kind in {sorted(_KINDS)}, got {kind!r}")
    return _KINDS[kind].from_state_dict(state, device=device)


# ---- drift helper ----

def principal_angle_degrees(u, v) -> float:
    """Largest principal angle, in degrees, between span(u) and span(v) (u: [d] or [d, k]; numpy or
    torch). Sign-blind for vectors; for subspaces of different sizes, the angle between the smaller
    one and its projection on the larger. Uses arcsin of the residual for small angles, where arccos
    of a cosine near 1 loses half the digits."""
    a = _host64(u, "u")
    b = _host64(v, "v")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"v: expected {a.shape[0]} rows like u, got {b.shape[0]}")
    qa, qb = _orth_host(a, "u"), _orth_host(b, "v")
    if qa.shape[1] > qb.shape[1]:
        qa, qb = qb, qa
    cos = np.linalg.svd(qb.T @ qa, compute_uv=False)  # [k_small]
    resid = qa - qb @ (qb.T @ qa)  # part of the smaller subspace outside the larger one
    sin_max = np.linalg.norm(resid, 2)
    cos_min = float(cos.min())
    if cos_min < math.sqrt(0.5):
        return math.degrees(math.acos(min(max(cos_min, 0.0), 1.0)))
    return math.degrees(math.asin(min(sin_max, 1.0)))


def _host64(x, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected a vector [d] or a basis [d, k], got shape {tuple(np.shape(x))}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains non-finite values")
    return a


def _orth_host(a: np.ndarray, name: str) -> np.ndarray:
    q, r = np.linalg.qr(a)
    diag = np.abs(np.diagonal(r))
    if diag.min() <= 1e-12 * max(diag.max(), 1e-300):
        raise ValueError(f"{name}: columns are zero or linearly dependent (rank < {a.shape[1]})")
    return q
