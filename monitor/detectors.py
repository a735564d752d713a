"""Detectors the sidecar runs on every frame.

spectral_spike: count the window's eigenvalues above the upper Marchenko–Pastur
edge σ²(1+√γ)² for a *calibrated* σ² per (model, layer), and alert when the
count exceeds a threshold. Eigenvalues are first divided by the window's mean
eigenvalue (trace_mean), so σ² is the noise share of the variance and the
detector sees spectral shape (variance piling into a few directions: repeated
or degenerate input, collapse), not the overall activation scale, which
drifts with position and prompt length.

Calibration is either loaded from a file or learned from the first N frames of
each layer: σ² = median of the frames' robust σ² estimates (sigma2/trace_mean),
threshold = the `quantile` of the spike counts those frames show against it
(so traffic like the calibration traffic alerts at about 1 − quantile per window).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eigenwatch.kernels.descriptors import count_spikes

CALIBRATION_FORMAT = "eigenwatch.calibration/v1"

# Severity numbers match the proto enum (SEVERITY_WARNING = 2, SEVERITY_CRITICAL = 3).
WARNING, CRITICAL = 2, 3
SEVERITY_NAMES = {1: "info", 2: "warning", 3: "critical"}


@dataclass
class LayerCalibration:
    sigma2: float  # noise variance relative to the window's mean eigenvalue
    spike_threshold: int  # alert when spikes > this
    frames: int = 0  # frames it was learned from (0: given)


@dataclass
class _Collecting:
    samples: list = field(default_factory=list)  # (eigs, window, dim, sigma2)


class CalibrationError(ValueError):
    pass


def load_calibration(path: str | Path) -> dict[tuple[str, int], LayerCalibration]:
    """Read a calibration file; errors name the file and the offending key."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"--calibration: no such file {str(path)!r}") from None
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"--calibration: {path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
        raise CalibrationError(f"--calibration: {path}: 'format' must be {CALIBRATION_FORMAT!r}")
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise CalibrationError(f"--calibration: {path}: 'models' must map model names to layers")
    out: dict[tuple[str, int], LayerCalibration] = {}
    for model, layers in models.items():
        if not isinstance(layers, dict):
            raise CalibrationError(f"--calibration: {path}: models.{model} must map layer indices to entries")
        for layer, entry in layers.items():
            where = f"models.{model}.{layer}"
            try:
                layer_i = int(layer)
            except ValueError:
                raise CalibrationError(f"--calibration: {path}: {where}: layer must be an integer") from None
            if not isinstance(entry, dict):
                raise CalibrationError(f"--calibration: {path}: {where} must be an object")
            sigma2 = entry.get("sigma2")
            thr = entry.get("spike_threshold")
            if not isinstance(sigma2, (int, float)) or not math.isfinite(sigma2) or sigma2 <= 0:
                raise CalibrationError(f"--calibration: {path}: {where}.sigma2 must be a finite number > 0, got {sigma2!r}")
            if not isinstance(thr, int) or isinstance(thr, bool) or thr < 0:
                raise CalibrationError(f"--calibration: {path}: {where}.spike_threshold must be an integer >= 0, got {thr!r}")
            out[(model, layer_i)] = LayerCalibration(float(sigma2), thr, int(entry.get("frames", 0)))
    return out


def dump_calibration(cal: dict[tuple[str, int], LayerCalibration]) -> dict:
    models: dict[str, dict[str, dict]] = {}
    for (model, layer), c in sorted(cal.items()):
        models.setdefault(model, {})[str(layer)] = {
            "sigma2": c.sigma2, "spike_threshold": c.spike_threshold, "frames": c.frames,
        }
    return {"format": CALIBRATION_FORMAT, "detector": "spectral_spike", "models": models}


@dataclass
class SpikeResult:
    spikes: int | None  # None while the layer is still calibrating
    severity: int = 0  # 0: no alert
    threshold: float = 0.0


class SpikeDetector:
    name = "spectral_spike"

    def __init__(
        self,
        calibration: dict[tuple[str, int], LayerCalibration] | None = None,
        calibration_frames: int = 64,
        quantile: float = 0.99,
        spike_threshold: int | None = None,
    ):
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
        self._collecting: dict[tuple[str, int], _Collecting] = {}
        self.on_calibrated = None  # callback(key, LayerCalibration)

    def observe(self, model: str, layer: int, eigs: np.ndarray, window: int, dim: int,
                sigma2_frame: float, trace_mean: float) -> SpikeResult:
        if trace_mean <= 0:  # zero-variance window: no spectrum, nothing to flag
            return SpikeResult(spikes=None)
        key = (model, layer)
        rel = np.asarray(eigs, dtype=np.float64) / trace_mean
        cal = self.calibration.get(key)
        if cal is None:
            col = self._collecting.setdefault(key, _Collecting())
            col.samples.append((rel, window, dim, sigma2_frame / trace_mean))
            if len(col.samples) < self.calibration_frames:
                return SpikeResult(spikes=None)
            cal = self._fit(col.samples)
            self.calibration[key] = cal
            del self._collecting[key]
            if self.on_calibrated is not None:
                self.on_calibrated(key, cal)
        threshold = cal.spike_threshold if self.spike_threshold is None else self.spike_threshold
        spikes = count_spikes(rel, window, dim, cal.sigma2)
        severity = 0
        if spikes > threshold:
            severity = CRITICAL if spikes >= 2 * threshold + 2 else WARNING
        return SpikeResult(spikes=spikes, severity=severity, threshold=float(threshold))

    def _fit(self, samples) -> LayerCalibration:
        sigma2 = float(np.median([s[3] for s in samples]))
        counts = [count_spikes(e, w, d, sigma2) for e, w, d, _ in samples]
        thr = int(math.ceil(np.quantile(counts, self.quantile)))
        return LayerCalibration(sigma2=sigma2, spike_threshold=thr, frames=len(samples))
