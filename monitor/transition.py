"""layer_transition: how each token's state moves from one tapped layer to the
next, against how reference tokens move (numpy only).

Per consecutive pair of tapped layers (a, b): a ridge regression predicts a
token's layer-b state from its layer-a state, fitted on the fit texts' kept
rows (monitor/tokenrows.py); the residuals (what the layers in between added
that the token's own earlier state does not predict: its use of context) get
a Ledoit–Wolf shrunk Gaussian (monitor/mahalanobis.ShrinkageGaussian). A
text's value for the pair is the mean over its tokens of the residual's
squared Mahalanobis distance / d; score = mean over pairs. Word order and
word choice change the context each token mixes in, not the tokens
themselves.

Live cost: per token and pair one d × d matmul and a low-rank Mahalanobis
(the same form as token_mahalanobis), all on rows the tap already holds.
"""

from __future__ import annotations

import numpy as np

from .mahalanobis import ShrinkageGaussian
from .tokenrows import pack, rows_of, unpack

RIDGE = 1e-2  # × the mean eigenvalue of the layer-a scatter


class LayerTransition:
    name = "layer_transition"

    def __init__(self):
        self.pairs: dict[tuple[int, int], dict] = {}

    def fit(self, feats: list[dict]) -> "LayerTransition":
        rows = rows_of(feats, self.name)
        layers = sorted(rows[0])
        if len(layers) < 2:
            raise ValueError(f"{self.name}: needs at least two tapped layers, got {layers}")
        for a, b in zip(layers[:-1], layers[1:]):
            A = np.concatenate([r[a] for r in rows]).astype(np.float64)
            B = np.concatenate([r[b] for r in rows]).astype(np.float64)
            ma, mb = A.mean(axis=0), B.mean(axis=0)
            Za = A - ma
            G = Za.T @ Za
            lam = RIDGE * max(float(np.trace(G)) / G.shape[0], 1e-12)
            W = np.linalg.solve(G + lam * np.eye(G.shape[0]), Za.T @ (B - mb))
            R = (B - mb) - Za @ W
            self.pairs[(a, b)] = {"ma": ma, "mb": mb, "W": W, "gauss": ShrinkageGaussian().fit(R)}
        return self

    def pair_values(self, text_rows: dict[int, np.ndarray]) -> dict[tuple[int, int], float]:
        out = {}
        for (a, b), m in self.pairs.items():
            if a not in text_rows or b not in text_rows:
                raise ValueError(f"{self.name}: the text has no rows of layer {a if a not in text_rows else b}; "
                                 "score with the tap settings of the calibration")
            A = np.asarray(text_rows[a], dtype=np.float64)
            B = np.asarray(text_rows[b], dtype=np.float64)
            R = (B - m["mb"]) - (A - m["ma"]) @ m["W"]
            out[(a, b)] = float(m["gauss"].sqdist(R).mean() / m["gauss"].p)
        return out

    def score(self, feats: list[dict]) -> np.ndarray:
        return np.array([np.mean(list(self.pair_values(r).values())) for r in rows_of(feats, self.name)])

    def state(self) -> dict:
        return {"pairs": [{"from": a, "to": b, "mean_from": pack(m["ma"]), "mean_to": pack(m["mb"]),
                           "W": pack(m["W"]), "gauss": m["gauss"].state()}
                          for (a, b), m in self.pairs.items()]}

    @classmethod
    def from_state(cls, st: dict) -> "LayerTransition":
        where = f"offline.detectors.{cls.name}"
        pairs = st.get("pairs") if isinstance(st, dict) else None
        if not isinstance(pairs, list) or not pairs:
            raise ValueError(f"{where}.pairs: expected a non-empty list of layer pairs, got {str(pairs)[:80]!r}")
        d = cls()
        for i, p in enumerate(pairs):
            at = f"{where}.pairs[{i}]"
            if not isinstance(p, dict):
                raise ValueError(f"{at}: expected an object")
            for key in ("from", "to", "mean_from", "mean_to", "W", "gauss"):
                if key not in p:
                    raise ValueError(f"{at}.{key} is missing; recalibrate")
            a, b = p["from"], p["to"]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)) or not a < b:
                raise ValueError(f"{at}: expected layer numbers from < to, got from={a!r} to={b!r}")
            ma, mb, W = (unpack(p[k], f"{at}.{k}").astype(np.float64) for k in ("mean_from", "mean_to", "W"))
            if W.shape != (len(ma), len(mb)):
                raise ValueError(f"{at}.W: expected shape [{len(ma)}, {len(mb)}], got {list(W.shape)}")
            try:
                g = ShrinkageGaussian.from_state(p["gauss"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{at}.gauss: damaged ({exc}); recalibrate") from None
            if g.p != len(mb):
                raise ValueError(f"{at}.gauss: width {g.p}, expected {len(mb)}")
            d.pairs[(a, b)] = {"ma": ma, "mb": mb, "W": W, "gauss": g}
        return d
