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
frames of each layer. Offline (`SpectralSpike`): fitted on reference texts'
windows; a text's score = max over its windows of (spikes − threshold), > 0
where the live sidecar would flag a window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eigenwatch.kernels.descriptors import count_spikes
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


@dataclass
class SpikeResult:
    spikes: int | None  # None while the layer is still calibrating (or the window has no spectrum)
    severity: int = 0  # 0: no alert
    threshold: float = 0.0


class SpikeDetector:
    """The live detector: calibrations per (model, layer), given or learned."""

    name = NAME

    def __init__(self, calibration: dict[tuple[str, int], LayerCalibration] | None = None,
                 calibration_frames: int = 64, quantile: float = 0.99, spike_threshold: int | None = None):
        if calibration_frames < 1:
            raise ValueError(f"calibration_frames: must be >= 1, got {calibration_frames}")
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile: must lie in (0, 1], got {quantile}")
        if spike_threshold is not None and spike_threshold < 0:
            raise ValueError(f"spike_threshold: must be >= 0, got {spike_threshold}")
        self.calibration: dict[tuple[str, int], LayerCalibration] = dict(calibration or {})
        self.calibration_frames = calibration_frames
        self.quantile = quantile
        self.spike_threshold = spike_threshold
        self._collecting: dict[tuple[str, int], list] = {}
        self.on_calibrated = None  # callback(key, LayerCalibration)

    def observe(self, model: str, layer: int, eigs: np.ndarray, window: int, dim: int,
                sigma2_frame: float, trace_mean: float) -> SpikeResult:
        """One frame. Raises DimMismatch for frames of another width than the calibration's."""
        key = (model, layer)
        cal = self.calibration.get(key)
        if cal is not None:
            check_dim(cal, model, layer, dim)
        rel = relative(eigs, sigma2_frame, trace_mean)
        if rel is None:
            return SpikeResult(spikes=None)
        if cal is None:
            samples = self._collecting.setdefault(key, [])
            samples.append((rel[0], window, dim, rel[1]))
            if len(samples) < self.calibration_frames:
                return SpikeResult(spikes=None)
            cal = self.calibration[key] = fit_layer(samples, self.quantile)
            del self._collecting[key]
            if self.on_calibrated is not None:
                self.on_calibrated(key, cal)
        threshold = cal.spike_threshold if self.spike_threshold is None else self.spike_threshold
        spikes = count_spikes(rel[0], window, dim, cal.sigma2)
        return SpikeResult(spikes=spikes, severity=severity(spikes, threshold), threshold=float(threshold))


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
