"""Hidden-state statistics against a calibrated Gaussian, for the combined
score's hidden-state voters: one place for the math the offline detectors
(monitor/mahalanobis.py, monitor/llmcheck.py) and the live tap
(hooks/hidden.py) both run, so live and offline give the same numbers.

- `LowRankGaussian`: mean m, Σ⁻¹ = (1/a)(I − U diag(w) Uᵀ) with w = bλ/(a + bλ)
  (a shrunk covariance a·I + b·U diag(λ) Uᵀ, U [p, r] orthonormal, r ≤ 256). Its
  state is the JSON the calibration file stores. Squared distance of a row:
  d²(x) = (‖z‖² − Σ_k w_k (u_kᵀ z)²) / a, z = x − m: O(p·r) per row (the tap's
  RowSqdist: O(p²) as one product), so the tap scores every token on the device
  without inverting a p × p matrix.
- `RowSqdist` (torch): that distance for a batch of rows (at several layers in
  one call), as one float32 sum of squares that loses no digits.
- `llmcheck_rows` / `llmcheck_scatter`: LLM-Check's hidden score (Sriramanan et
  al., 2024) of a text's first LLMCHECK_ROWS rows at one layer (both the tap and
  the offline capture keep those rows), through the n × n Gram while n ≤ p, or
  from the rows' sums.
- `LinearProbe`: a linear head on one layer's token states (the token_probe
  detector, monitor/token_probe.py); its mean logit over a text's rows is the
  head applied to the rows' mean, so the tap needs only the Σx it already keeps.
- `middle_layer`: the layer LLM-Check reads; `calibration_id`: the short id of a
  calibration's detector states, which the tap sends with its statistics so the
  sidecar never combines numbers made against another file.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

RIDGE = 1e-3  # LLM-Check's ridge on σ²
# LLM-Check reads a text's first LLMCHECK_ROWS rows at its layer. A whole request's
# rows would cost the tap min(n, p)·p numbers per request and, past p rows, a p × p
# scatter update per request per step: 134 MB and a 4096² rank-1 update per decode
# token at p = 4096 (an 8B model). The first 256 keep it at 256·p float32 per
# request and one copy per step. MiniLM reads at most 256 tokens anyway; on the
# tiny Llama 58 of bench/bench_detect.py's 1,450 texts are longer, and its
# AUROCs moved by ≤ 0.003 (README).
LLMCHECK_ROWS = 256


def middle_layer(layers) -> int:
    """The layer whose hidden states LLM-Check reads: the middle tapped one."""
    layers = sorted(layers)
    return layers[len(layers) // 2]


def calibration_id(detectors: dict) -> str:
    """16 hex characters identifying a calibration's detector states (its
    offline.detectors section), the same on the tap and the sidecar."""
    blob = json.dumps(detectors, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class LowRankGaussian:
    """Mean + shrunk covariance a·I + b·U diag(λ) Uᵀ in low-rank form (see the
    module docstring); monitor/mahalanobis.ShrinkageGaussian fits it."""

    mean: np.ndarray  # [p]
    a: float
    b: float
    shrinkage: float
    lam: np.ndarray  # [r]
    U: np.ndarray  # [p, r]
    p: int

    def weights(self) -> np.ndarray:
        """w_k = bλ_k / (a + bλ_k): how much of direction k Σ⁻¹ takes out, [r]."""
        return self.b * self.lam / (self.a + self.b * self.lam)

    def sqdist(self, X) -> np.ndarray:
        """Squared Mahalanobis distances of the rows of X [n, p] to the mean: [n]."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        Z = X - self.mean
        proj = Z @ self.U
        d2 = ((Z ** 2).sum(axis=1) - (proj ** 2 * self.weights()).sum(axis=1)) / self.a
        return np.maximum(d2, 0.0)

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "a": self.a, "b": self.b, "shrinkage": self.shrinkage,
                "lam": self.lam.tolist(), "U": self.U.tolist(), "p": self.p}

    @classmethod
    def from_state(cls, st: dict):
        g = cls()
        g.mean = np.asarray(st["mean"], dtype=np.float64)
        g.a, g.b, g.shrinkage, g.p = float(st["a"]), float(st["b"]), float(st["shrinkage"]), int(st["p"])
        g.lam = np.asarray(st["lam"], dtype=np.float64)
        g.U = np.asarray(st["U"], dtype=np.float64).reshape(g.p, len(g.lam))
        if g.mean.shape != (g.p,) or not g.a > 0:
            raise ValueError(f"a Gaussian of width p={g.p} needs mean [{g.p}] and a > 0, "
                             f"got mean {list(g.mean.shape)} and a={g.a}")
        return g


class LinearProbe:
    """A linear head logit(x) = w·x + b on the token states of one layer. A text's
    value is the mean logit over its rows, = w·(Σx/n) + b: the tap computes it
    from the request's Σx per layer at its end (or at any frame, for a running
    value), O(p) once per request, nothing per token."""

    def __init__(self, layer: int, w, b: float):
        self.layer, self.w, self.b = int(layer), np.asarray(w, dtype=np.float64), float(b)

    def mean_logit(self, mean) -> float:
        """The mean logit of rows whose mean is `mean` [p]."""
        return float(np.dot(np.asarray(mean, dtype=np.float64), self.w) + self.b)

    def state(self) -> dict:
        return {"layer": self.layer, "w": self.w.tolist(), "b": self.b}

    @classmethod
    def from_state(cls, st, where: str = "token_probe") -> "LinearProbe":
        """ValueError naming `where`'s field when the state is damaged."""
        if not isinstance(st, dict):
            raise ValueError(f"{where}: expected an object with layer, w and b, got {str(st)[:80]!r}")
        for key in ("layer", "w", "b"):
            if key not in st:
                raise ValueError(f"{where}.{key} is missing; recalibrate")
        layer, w, b = st["layer"], st["w"], st["b"]
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ValueError(f"{where}.layer: expected a layer number >= 0, got {layer!r}")
        if (not isinstance(w, list) or not w
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)):
            raise ValueError(f"{where}.w: expected a non-empty list of numbers, got {str(w)[:80]!r}")
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"{where}.b: expected a number, got {b!r}")
        probe = cls(layer, w, b)
        if not (np.isfinite(probe.w).all() and np.isfinite(probe.b)):
            raise ValueError(f"{where}: w or b holds NaN/Inf; recalibrate")
        return probe


class RowSqdist:
    """torch: d²(x_t)/p of batches of rows against `LowRankGaussian`s of one width,
    on the rows' device, float64 and ≥ 0. One Gaussian: rows [N, p] -> [N]. Several
    (the tap's layers, one call per step): rows [G, N, p] -> [G, N], Gaussian g
    scoring x[g]. The tap calls it on every token it keeps.

    d²·a = Σ_k (1 − w_k)(u_kᵀz)² + ‖Vᵀz‖², z = x − m, V an orthonormal basis of
    the directions U leaves out (p − r of them; none when r = p): the same number
    as `LowRankGaussian.sqdist`, as one sum of squares, so nothing cancels. With
    the weights folded in it is ‖zB‖² for B = [U·diag(√(1 − w)), V] [p, p]: one
    product, in float32. The mean is subtracted in two float32 parts (m rounded,
    then the rounding's remainder): where x is near m (a dimension with a large
    mean and a small spread) the first difference is exact, so z keeps its
    digits as if centred in float64. Against the float64 reference, relative per
    row: ≤ 1e-6 on the tests' spectra (condition numbers up to 4·10⁵,
    tests/test_hidden_stats.py), ≤ 4.1e-6 on bench/bench_hidden.py's (10⁵, a
    mean of 3,000 in one dimension): there the float32 rounding of z's wide
    components reaches the narrow directions. The first form (‖z‖² − ‖Uᵀz‖² for
    the left-out directions, float64 centring and float64 for the widest
    directions) lost up to 1.1e-5 and 1.9e-5 on the same rows when r < p (1.9e-6
    against 2.6e-6 at full rank); (‖z‖² − Σ w_k (u_kᵀz)²)/a with float32
    projections up to 2%. Against the first form (float64 centring and residual, per layer), one
    run on 3 layers × 4,096 rows: 0.47× the time at p = r = 256, 0.63× at
    p = 384, r = 256, where V's 128 columns make the product p × p; 0.41× and
    0.73× on 3 × 64 rows (a decode step). Past p = 2r the product with V would
    be the larger one (p = 4096, r = 256: 16× the work of Uᵀz), so there the
    left-out part is ‖z − U Uᵀz‖², from one product with [U·diag(√(1 − w)), U]
    [p, 2r] and one with Uᵀ: 3·p·r per row. The residual is formed, not taken
    as ‖z‖² − ‖Uᵀz‖², which cancels when z lies almost inside U's span: on
    bench/bench_hidden.py --p 4096, 2.8e-4 as a difference, 1.1e-6 formed (and
    6.5× the float64 reference's time through V, 1.1–1.6× this way, one CPU
    thread against numpy's BLAS).
    """

    def __init__(self, gs, device):
        import torch

        self.single = isinstance(gs, LowRankGaussian)
        gs = [gs] if self.single else list(gs)
        p = gs[0].p
        if any(g.p != p for g in gs):
            raise ValueError(f"RowSqdist: Gaussians of widths {sorted({g.p for g in gs})}; one call needs one width")
        rmax = max(g.U.shape[1] for g in gs)
        # V would make the product p × p; past p = 2r (an 8B model: p = 4096, r = 256) that
        # is more than U and U scaled together, and the left-out part is ‖z‖² − ‖Uᵀz‖².
        self.resid = p > 2 * rmax
        B = np.zeros((len(gs), p, 2 * rmax if self.resid else p))  # zero columns where a Gaussian has fewer
        for i, g in enumerate(gs):
            r = g.U.shape[1]
            B[i, :, :r] = g.U * np.sqrt(1.0 - g.weights())
            if self.resid:
                B[i, :, rmax:rmax + r] = g.U
            elif r < p:  # the left-out directions, weight 1
                B[i, :, r:] = np.linalg.qr(g.U, mode="complete")[0][:, r:]
        self.rmax = rmax
        # [G, r, p]: Uᵀ, to take Uᵀz back out of z (resid)
        self.Ut = torch.as_tensor(B[:, :, rmax:].transpose(0, 2, 1).copy(), dtype=torch.float32, device=device) \
            if self.resid else None
        mean = np.stack([g.mean for g in gs])  # [G, p]
        m_hi = mean.astype(np.float32)
        self.B = torch.as_tensor(B, dtype=torch.float32, device=device)  # [G, p, p]
        self.m_hi = torch.as_tensor(m_hi, device=device)[:, None]  # [G, 1, p] float32
        self.m_lo = torch.as_tensor((mean - m_hi).astype(np.float32), device=device)[:, None]  # the remainder
        self.scale = torch.as_tensor([g.a * g.p for g in gs], dtype=torch.float64, device=device)[:, None]  # [G, 1]

    def to(self, device) -> "RowSqdist":
        """The same distances on another device (the bases are built once, on the CPU:
        a complete QR per Gaussian, 80 ms at p = 384, kept out of the first forward)."""
        for name in ("B", "Ut", "m_hi", "m_lo", "scale"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def __call__(self, x, centred: bool = False):
        """x [G, N, p] (or [N, p] for one Gaussian) -> d²/p, [G, N] (or [N]) float64.
        centred: x is float32 and already x − m_hi (m rounded to float32: the tap sums
        the same centred rows), and is overwritten; otherwise x is left as it is."""
        import torch

        if self.single:
            x = x[None]  # [1, N, p]
        # [G, N, p] float32: z = x − m in two parts (see the class docstring)
        z = x.sub_(self.m_lo) if centred else (x.float() - self.m_hi).sub_(self.m_lo)
        y = torch.bmm(z, self.B)

        def sq(t):  # [G, N] float64 squared norms of the last dimension
            return torch.linalg.vector_norm(t, dim=2).double().square_()

        if self.resid:  # a·d² = ‖scaled Uᵀz‖² + ‖z − U Uᵀz‖²: the residual itself, not a difference of norms
            d2 = sq(y[..., :self.rmax]) + sq(z.sub_(torch.bmm(y[..., self.rmax:], self.Ut)))
        else:
            d2 = sq(y)  # [G, N] a·d²
        d2 = d2.div_(self.scale)
        return d2[0] if self.single else d2


def llmcheck_scatter(count: int, total, scatter, ridge: float = RIDGE) -> float:
    """LLM-Check's score, mean_i ½·log(σ_i² + ridge) over the top min(n, d)
    singular values σ_i of the text's centred rows Z, from (n, Σx [d], XᵀX [d, d]).

    Through one Cholesky factorisation, not an eigensolve (≈ 4× less work at
    d = 384): with m = min(n, d), the centred scatter C = ZᵀZ has rank ≤ m, so all
    but its top m eigenvalues are 0 and log det(C + ridge·I) = Σ_top-m log(λ_i +
    ridge) + (d − m)·log(ridge). The score is then (log det − (d − m)·log ridge) / 2m.
    Falls back to the eigensolve when C + ridge·I is not numerically positive
    definite (NaN input, a scatter not from real rows)."""
    mu = np.asarray(total, dtype=np.float64) / count
    c = np.asarray(scatter, dtype=np.float64) - count * np.outer(mu, mu)  # Zᵀ Z
    return _logdet_score(0.5 * (c + c.T), min(count, c.shape[0]), ridge)


def llmcheck_rows(X, ridge: float = RIDGE) -> float:
    """The same score from the rows X [n, d] themselves: through the n × n Gram
    Z Zᵀ when n ≤ d (its eigenvalues are the σ_i², exactly the top n of ZᵀZ),
    through the scatter otherwise."""
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    if n > d:
        return llmcheck_scatter(n, X.sum(axis=0), X.T @ X, ridge)
    Z = X - X.mean(axis=0)
    g = Z @ Z.T
    return _logdet_score(0.5 * (g + g.T), n, ridge)


def _logdet_score(c: np.ndarray, m: int, ridge: float) -> float:
    """(log det(c + ridge·I) − (dim − m)·log ridge) / 2m for a PSD c of rank ≤ m."""
    dim = c.shape[0]
    try:
        chol = np.linalg.cholesky(c + ridge * np.eye(dim))
    except np.linalg.LinAlgError:
        lam = np.linalg.eigvalsh(c)[::-1][:m]  # σ_i², descending
        return float(np.mean(0.5 * np.log(np.maximum(lam, 0.0) + ridge)))
    logdet = 2.0 * float(np.sum(np.log(np.diagonal(chol))))
    return (logdet - (dim - m) * np.log(ridge)) / (2.0 * m)
