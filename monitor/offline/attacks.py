"""EigenShield's attack table, shared by `eigenwatch shield eval` and bench/bench_shield.py:
a logistic probe on embeddings and ε-bounded L2 attacks on it, with no defence or behind a projection.

ASR (attack success rate) = of the rows the defended pipeline gets right, the
fraction an ε-bounded L2 perturbation of the embedding flips. (a) does not know
the defence: δ = −ε·t·w/‖w‖ along the probe's gradient (t = ±1 the true class).
(b) knows it: for a linear defence y = μ + P(x − μ) the probe's margin moves by
(Pw)·δ, so the worst δ in the ball is −ε·t·Pw/‖Pw‖ exactly — the point L2 PGD
through the projection converges to (an earlier bench ran 20 steps of it with
torch autograd), with no optimiser and no torch.
"""

from __future__ import annotations

import math

import numpy as np

EPS = (0.1, 0.2)


def stratified_split(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a 50/25/25 split, per class, shuffled with `seed`; each part sorted."""
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = len(idx)
        parts[0].append(idx[: n // 2])
        parts[1].append(idx[n // 2 : (3 * n) // 4])
        parts[2].append(idx[(3 * n) // 4 :])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


class Linear:
    """A projection defence x -> μ + (x − μ)UUᵀ (U [d, k]); U = None: no defence.
    With `shield` (kernels/shield.py), its own project does the work."""

    def __init__(self, name: str, mean=None, basis=None, shield=None):
        self.name, self.shield = name, shield
        self.mean = shield.mean if shield is not None else mean
        self.basis = shield.basis if shield is not None else basis

    @property
    def k(self):
        return "all" if self.basis is None else self.basis.shape[1]

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.basis is None:
            return x
        if self.shield is not None:
            return self.shield.project(x).y
        return self.mean + ((x - self.mean) @ self.basis) @ self.basis.T

    def direction(self, w: np.ndarray) -> np.ndarray:
        """Pw: the part of the probe's weight the defence lets through (attack b pushes along it)."""
        return w if self.basis is None else self.basis @ (self.basis.T @ w)


def margins(probe: dict, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """t·(w·z + b), t = ±1 the true class: > 0 means correct."""
    return (2 * y - 1) * (z @ probe["w"] + probe["b"])


def fit_probe(x: np.ndarray, y: np.ndarray, c: float = 1.0, max_iter: int = 100) -> dict:
    """L2-regularised logistic regression, scikit-learn's LogisticRegression(C=c)
    objective: ½‖w‖² + c·Σ log(1 + exp(−t(w·x + b))), b not penalised. Newton's
    method with backtracking; the objective is strictly convex, so the optimum is
    the one any solver finds. x [N, d], y [N] in {0, 1} -> {"w": [d], "b": float}."""
    x = np.asarray(x, dtype=np.float64)
    t = (2 * np.asarray(y) - 1).astype(np.float64)  # [N]
    n, d = x.shape
    z = np.hstack([x, np.ones((n, 1))])  # [N, d+1]
    reg = np.ones(d + 1)
    reg[-1] = 0.0  # the intercept is not penalised

    def objective(th: np.ndarray) -> float:
        return 0.5 * float(np.sum(reg * th * th)) + c * float(np.sum(np.logaddexp(0.0, -t * (z @ th))))

    theta = np.zeros(d + 1)
    f = objective(theta)
    for _ in range(max_iter):
        m = t * (z @ theta)  # [N] margins
        p = np.exp(-np.logaddexp(0.0, m))  # σ(−m), the loss's slope, without overflow
        grad = reg * theta - c * (z.T @ (t * p))  # [d+1]
        hess = np.diag(reg) + c * (z.T * (p * (1.0 - p))) @ z  # [d+1, d+1], positive definite
        step = np.linalg.solve(hess, grad)
        decrement = float(grad @ step)  # Newton decrement²: f − f* ≈ decrement/2 near the optimum
        if decrement / 2 <= 1e-12 * max(1.0, abs(f)):
            break
        s = 1.0
        while True:  # backtracking (Armijo)
            new = theta - s * step
            f_new = objective(new)
            if f_new <= f - 1e-4 * s * decrement or s < 1e-12:
                break
            s *= 0.5
        theta, f = new, f_new
    return {"w": theta[:d], "b": float(theta[d])}


def _rate(flipped: np.ndarray, ok: np.ndarray) -> float:
    return float(flipped[ok].mean()) if ok.any() else math.nan


def evaluate(probe: dict, defence: Linear, x: np.ndarray, y: np.ndarray, eps=EPS, adaptive: bool = True) -> dict:
    """{"acc": clean accuracy, ("a", ε): ASR of (a), ("b", ε): ASR of (b) (adaptive only)}."""
    ok = margins(probe, defence.apply(x), y) > 0
    out = {"acc": float(ok.mean())}
    w = probe["w"]
    t = (2 * y - 1)[:, None]
    pw = defence.direction(w)
    npw = float(np.linalg.norm(pw))
    for e in eps:
        flipped = margins(probe, defence.apply(x - e * t * w / np.linalg.norm(w)), y) <= 0
        out[("a", e)] = _rate(flipped, ok)
        if adaptive:
            # Pw = 0: the defence removes all of w, nothing moves the margin
            delta = -e * t * pw / npw if npw > 0 else np.zeros_like(x)
            flipped = margins(probe, defence.apply(x + delta), y) <= 0
            out[("b", e)] = _rate(flipped, ok)
    return out


def header(eps=EPS, width: int = 44) -> str:
    return f"{'':<{width}}  {'clean':>5}  " + "  ".join(f"{k}@{e:<11}" for k in ("ASR(a)", "ASR(b)") for e in eps)


def row(label: str, r: dict, base: dict | None, eps=EPS, width: int = 44) -> str:
    """One line of the table; with `base`, each ASR's change relative to it in ()."""
    cells = [f"{label:<{width}}", f"{r['acc']:.3f}"]
    for kind in ("a", "b"):
        for e in eps:
            v = r[(kind, e)]
            b = None if base is None else base[(kind, e)]
            rel = "" if not b else f" ({(v - b) / b:+.0%})"
            cells.append(f"{v:.3f}{rel:>7}")
    return "  ".join(cells)
