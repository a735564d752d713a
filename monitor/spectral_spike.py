"""spectral_spike: eigenvalues above the calibrated Marchenko–Pastur edge, the
live sidecar's rule and the offline detector, in one module.

A window's eigenvalues are first divided by its mean eigenvalue (trace_mean),
so σ² is the noise share of the variance and the detector sees spectral shape
(variance piling into a few directions: repeated or degenerate input,
collapse), not the overall activation scale, which drifts with position and
prompt length. Per (model, layer): σ² = the median over calibration windows of
their robust σ² estimate (descriptor sigma2 / trace_mean), and the threshold =
ceil of the `quantile` of the spike counts those windows show against the edge
σ²(1+√γ)² (so traffic like the calibration traffic exceeds it in about
1 − quantile of windows). Severity: warning above the threshold, critical at
≥ 2 × threshold + 2.

Live (`SpikeDetector`): calibration from a file or learned from the first N
frames of each layer — from many requests, so that no one client decides it:
each request contributes at most ceil(N / R) frames (R = --calibration-requests,
at most N), frames with physically impossible values are not learned from (a σ²
above what any spectrum with that mean eigenvalue allows, eigenvalues that do
not sum to between 1 and W mean eigenvalues, negative eigenvalues), σ² is the
median over requests of each request's median, and the threshold is the
`quantile` of the spike counts of the requests left after trimming those whose
median count is an outlier (above the median of request medians by more than
max(2, 3 scaled MADs)). A layer's buffer holds float32 relative eigenvalues and
goes when the layer is calibrated, or after `idle_s` without frames (`sweep`).
Offline (`SpectralSpike`): fitted on reference texts'
windows; a text's score = max over its windows of (spikes − threshold), > 0
where the live sidecar would flag a window.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from eigenwatch.kernels.descriptors import count_spikes, mp_gamma
from eigenwatch.kernels.rmt import mp_edges, mp_quantile
from eigenwatch.v1 import monitor_pb2

from .calibration import LayerCalibration

NAME = "spectral_spike"
WARNING, CRITICAL = monitor_pb2.SEVERITY_WARNING, monitor_pb2.SEVERITY_CRITICAL


class DimMismatch(ValueError):
    """Frames whose width differs from the one a layer was calibrated at."""


def relative(eigs, sigma2: float, trace_mean: float) -> tuple[np.ndarray, float] | None:
    """(eigenvalues / trace_mean, sigma2 / trace_mean) of one window; None for a
    zero-variance window (no spectrum, nothing to flag)."""
    if not trace_mean > 0:
        return None
    return np.asarray(eigs, dtype=np.float64) / trace_mean, float(sigma2) / trace_mean


_MP_MEDIAN: dict[float, float] = {}


def max_sigma2_rel(window: int, dim: int) -> float:
    """The largest σ²/mean eigenvalue a window's spectrum can give: its median non-zero
    eigenvalue is at most twice their mean, and σ² = median / the MP median."""
    gamma = round((window - 1) / dim, 9)
    med = _MP_MEDIAN.get(gamma)
    if med is None:
        if len(_MP_MEDIAN) > 4096:
            _MP_MEDIAN.clear()
        med = _MP_MEDIAN[gamma] = float(mp_quantile(0.5, gamma))
    return 2.0 / med * 1.01  # 1%: the float32 rounding of the eigenvalues


def implausible(rel_eigs: np.ndarray, window: int, dim: int, sigma2_rel: float) -> str | None:
    """Why a window's (eigenvalues / trace_mean, sigma2 / trace_mean) cannot come from a real
    centred Gram (None when they can)."""
    if not (0.0 <= sigma2_rel <= max_sigma2_rel(window, dim)):
        return "sigma2"
    total = float(rel_eigs.sum())  # = non-zero eigenvalues p, 1 <= p <= W
    if not (0.99 <= total <= 1.01 * window):
        return "trace_mean"
    if rel_eigs.size and float(rel_eigs.min()) < -1e-3 * float(np.abs(rel_eigs).max()):
        return "eigenvalues"
    return None


def fit_requests(samples, quantile: float) -> LayerCalibration:
    """The robust live fit. samples: [(rel_eigs, window, dim, sigma2_rel, request), ...] of one layer,
    from several requests: σ² = median over requests of their median σ²; threshold = `quantile` of
    the spike counts of the requests whose median count is not an outlier."""
    by_req: dict[str, list] = {}
    for smp in samples:
        by_req.setdefault(smp[4], []).append(smp)
    sigma2 = float(np.median([np.median([smp[3] for smp in group]) for group in by_req.values()]))
    counts = {r: [count_spikes(smp[0], smp[1], smp[2], sigma2) for smp in group] for r, group in by_req.items()}
    med = {r: float(np.median(c)) for r, c in counts.items()}
    center = float(np.median(list(med.values())))
    mad = 1.4826 * float(np.median([abs(m - center) for m in med.values()]))
    limit = center + max(2.0, 3.0 * mad)
    kept = [c for r, cs in counts.items() if med[r] <= limit for c in cs]
    dims = {int(smp[2]) for smp in samples}
    return LayerCalibration(sigma2=sigma2, spike_threshold=int(math.ceil(np.quantile(kept, quantile))),
                            frames=len(samples), dim=dims.pop() if len(dims) == 1 else 0)


class _Collecting:
    """A layer's calibration buffer: samples, frames per request, bytes, last update."""

    __slots__ = ("samples", "per_request", "nbytes", "updated")

    def __init__(self):
        self.samples: list = []
        self.per_request: dict[str, int] = {}
        self.nbytes = 0
        self.updated = 0.0


SAMPLE_BYTES = 256  # the tuple, its floats and the array header around each sample's eigenvalues


def fit_layer(samples, quantile: float) -> LayerCalibration:
    """samples: [(rel_eigs, window, dim, sigma2_rel, ...), ...] of one layer."""
    sigma2 = float(np.median([s[3] for s in samples]))
    counts = [count_spikes(s[0], s[1], s[2], sigma2) for s in samples]
    dims = {int(s[2]) for s in samples}
    return LayerCalibration(sigma2=sigma2, spike_threshold=int(math.ceil(np.quantile(counts, quantile))),
                            frames=len(samples), dim=dims.pop() if len(dims) == 1 else 0)


def severity(spikes: int, threshold: int) -> int:
    if spikes <= threshold:
        return 0
    return CRITICAL if spikes >= 2 * threshold + 2 else WARNING


def check_dim(cal: LayerCalibration, model: str, layer: int, dim: int) -> None:
    if cal.dim and dim != cal.dim:
        raise DimMismatch(
            f"dim: frames of model {model!r} layer {layer} have width {dim}, but its calibration was made "
            f"with width {cal.dim}: the tap's settings differ from the calibration's (EIGENWATCH_PROJ_DIM "
            "projects rows to that many dims). Recalibrate with the tap's settings, or run the tap with "
            "the calibration's (its 'tap' section lists them)")


@dataclass(frozen=True, slots=True)
class SpikeResult:
    spikes: int | None  # None while the layer is still calibrating (or the window has no spectrum)
    severity: int = 0  # 0: no alert
    threshold: float = 0.0


NO_SPECTRUM = SpikeResult(spikes=None)


class SpikeDetector:
    """The live detector: calibrations per (model, layer), given or learned."""

    name = NAME

    def __init__(self, calibration: dict[tuple[str, int], LayerCalibration] | None = None,
                 calibration_frames: int = 64, quantile: float = 0.99, spike_threshold: int | None = None,
                 calibration_requests: int = 8):
        if calibration_frames < 1:
            raise ValueError(f"calibration_frames: must be >= 1, got {calibration_frames}")
        if calibration_requests < 1:
            raise ValueError(f"calibration_requests: must be >= 1, got {calibration_requests}")
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile: must lie in (0, 1], got {quantile}")
        if spike_threshold is not None and spike_threshold < 0:
            raise ValueError(f"spike_threshold: must be >= 0, got {spike_threshold}")
        self.calibration: dict[tuple[str, int], LayerCalibration] = dict(calibration or {})
        self.calibration_frames = calibration_frames
        self.quantile = quantile
        self.spike_threshold = spike_threshold
        # Requests a calibration must come from, and the frames each may give.
        self.calibration_requests = min(calibration_requests, calibration_frames)
        self.per_request_cap = -(-calibration_frames // self.calibration_requests)
        self._collecting: dict[tuple[str, int], _Collecting] = {}
        self.buffer_bytes = 0  # held by the calibration buffers
        self.on_calibrated = None  # callback(key, LayerCalibration)
        self.on_refused = None  # callback(reason) for a frame not learned from
        self._edges: dict[tuple, tuple] = {}  # (key, window, dim) -> (calibration, MP edge, threshold)
        self._results: dict[tuple, SpikeResult] = {}  # (spikes, threshold) -> its SpikeResult (immutable, shared)

    def _refuse(self, reason: str) -> SpikeResult:
        if self.on_refused is not None:
            self.on_refused(reason)
        return SpikeResult(spikes=None)

    def observe(self, model: str, layer: int, eigs: np.ndarray, window: int, dim: int,
                sigma2_frame: float, trace_mean: float, request: str = "") -> SpikeResult:
        """One frame (of request `request`, for the per-request cap on what a calibration learns
        from). Raises DimMismatch for frames of another width than the calibration's."""
        key = (model, layer)
        cal = self.calibration.get(key)
        if cal is not None:
            check_dim(cal, model, layer, dim)
        rel = relative(eigs, sigma2_frame, trace_mean)
        if rel is None:
            return SpikeResult(spikes=None)
        if cal is None:
            if implausible(rel[0], window, dim, rel[1]) is not None:
                return self._refuse("calibration_impossible")
            buf = self._collecting.get(key)
            if buf is None:
                buf = self._collecting[key] = _Collecting()
            n = buf.per_request.get(request, 0)
            if n >= self.per_request_cap:
                return self._refuse("calibration_request_cap")
            buf.per_request[request] = n + 1
            sample = rel[0].astype(np.float32)
            buf.samples.append((sample, window, dim, rel[1], request))
            nbytes = sample.nbytes + SAMPLE_BYTES + len(request)
            buf.nbytes += nbytes
            self.buffer_bytes += nbytes
            buf.updated = time.monotonic()
            if len(buf.samples) < self.calibration_frames or len(buf.per_request) < self.calibration_requests:
                return SpikeResult(spikes=None)
            cal = self.calibration[key] = fit_requests(buf.samples, self.quantile)
            self._drop(key)
            if self.on_calibrated is not None:
                self.on_calibrated(key, cal)
        threshold = cal.spike_threshold if self.spike_threshold is None else self.spike_threshold
        spikes = count_spikes(rel[0], window, dim, cal.sigma2)
        return SpikeResult(spikes=spikes, severity=severity(spikes, threshold), threshold=float(threshold))

    def observe_calibrated(self, keys, eigs: np.ndarray, windows, dims,
                           trace_mean: np.ndarray) -> list[SpikeResult | None]:
        """`observe` for many frames at once (a FrameBatch's spectrum frames of one window size):
        keys [n] (model, layer), eigs [n, W] float64, windows, dims [n], the frames' trace_mean
        [n] (their sigma2 matters only to a layer still calibrating). The frames of calibrated
        layers at the calibration's width get their SpikeResult, the spikes counted in one numpy
        pass per (layer, shape) with `observe`'s arithmetic; the others (a layer still
        calibrating, another width) get None: pass them to `observe`."""
        out: list[SpikeResult | None] = [None] * len(keys)
        groups: dict[tuple, list[int]] = {}  # (key, window, dim) -> rows: a batch holds a few
        for i, ek in enumerate(zip(keys, windows, dims)):
            rows = groups.get(ek)
            if rows is None:
                rows = groups[ek] = []
            rows.append(i)
        calibration, cache, results = self.calibration, self._edges, self._results
        trace_mean = np.asarray(trace_mean, dtype=np.float64)
        for ek, rows in groups.items():
            key, window, dim = ek
            cal = calibration.get(key)
            if cal is None:
                continue
            hit = cache.get(ek)
            if hit is None or hit[0] is not cal:  # first frame of this shape, or a new calibration
                if cal.dim and dim != cal.dim:
                    continue
                if len(cache) >= 4096:
                    cache.clear()
                hit = cache[ek] = (cal, mp_edges(mp_gamma(window, dim), cal.sigma2)[1],
                                   cal.spike_threshold if self.spike_threshold is None else self.spike_threshold)
            _, edge, t = hit
            tm = trace_mean[rows]
            with np.errstate(invalid="ignore", divide="ignore"):
                counts = np.count_nonzero(eigs[rows] / tm[:, None] > edge, axis=1).tolist()  # as `relative`
            usable = (tm > 0).tolist()
            for i, c, ok in zip(rows, counts, usable):
                if not ok:
                    out[i] = NO_SPECTRUM  # `relative`: no spectrum, nothing to flag
                    continue
                res = results.get((c, t))
                if res is None:
                    if len(results) >= 4096:
                        results.clear()
                    res = results[(c, t)] = SpikeResult(spikes=c, severity=severity(c, t), threshold=float(t))
                out[i] = res
        return out

    def _drop(self, key) -> None:
        buf = self._collecting.pop(key, None)
        if buf is not None:
            self.buffer_bytes -= buf.nbytes

    def sweep(self, idle_s: float, now: float | None = None) -> int:
        """Drop the calibration buffers of layers that got no frame for idle_s (a model or layer
        that went away before it calibrated). Returns how many."""
        now = time.monotonic() if now is None else now
        stale = [k for k, buf in self._collecting.items() if now - buf.updated > idle_s]
        for k in stale:
            self._drop(k)
        return len(stale)


class SpectralSpike:
    """The offline detector over per-text features (monitor/offline/features.py:
    "spectra" = {layer: [(rel_eigs, window, dim, sigma2_rel, token_count), ...]})."""

    name = NAME

    def __init__(self, quantile: float = 0.99):
        self.quantile = quantile
        self.layers: dict[int, LayerCalibration] = {}

    def fit(self, feats: list[dict]) -> "SpectralSpike":
        by_layer: dict[int, list] = {}
        for f in feats:
            for layer, wins in f["spectra"].items():
                by_layer.setdefault(int(layer), []).extend(wins)
        self.layers = {layer: fit_layer(wins, self.quantile) for layer, wins in sorted(by_layer.items())}
        return self

    def layer_spikes(self, feat: dict) -> dict[int, list[int]]:
        """Spikes above each calibrated layer's edge, window by window."""
        return {int(layer): [count_spikes(w[0], w[1], w[2], self.layers[int(layer)].sigma2) for w in wins]
                for layer, wins in feat["spectra"].items() if int(layer) in self.layers}

    def score(self, feats: list[dict]) -> np.ndarray:
        out = np.empty(len(feats))
        for i, f in enumerate(feats):
            best = -math.inf
            for layer, counts in self.layer_spikes(f).items():
                if counts:
                    best = max(best, max(counts) - self.layers[layer].spike_threshold)
            out[i] = best if best > -math.inf else 0.0
        return out

    def top_window(self, feat: dict) -> dict | None:
        """The text's window with the most spikes above its layer's calibrated edge
        (ties: the earliest), in the units count_spikes uses — for reports."""
        best, out = -1, None
        for layer, wins in sorted(feat["spectra"].items()):
            cal = self.layers.get(int(layer))
            if cal is None:
                continue
            for w in wins:
                k = count_spikes(w[0], w[1], w[2], cal.sigma2)
                if k > best:
                    best = k
                    out = {"layer": int(layer), "token_count": int(w[4]) if len(w) > 4 else None,
                           "window": int(w[1]), "dim": int(w[2]), "sigma2": float(cal.sigma2),
                           "spikes": int(k), "spike_threshold": int(cal.spike_threshold),
                           "eigenvalues": [float(v) for v in w[0]]}
        return out

    def state(self) -> dict:
        return {"quantile": self.quantile,
                "layers": {str(k): {"sigma2": c.sigma2, "spike_threshold": c.spike_threshold, "frames": c.frames,
                                    "dim": c.dim} for k, c in self.layers.items()}}

    @classmethod
    def from_state(cls, st: dict) -> "SpectralSpike":
        d = cls(st["quantile"])
        d.layers = {int(k): LayerCalibration(float(v["sigma2"]), int(v["spike_threshold"]), int(v.get("frames", 0)),
                                             int(v.get("dim", 0))) for k, v in st["layers"].items()}
        return d
