"""CALIB.json, the calibration file: every section, its version, a checked load
and an atomic save. The one module that reads or writes it.

    {"format": "eigenwatch.calibration/v1",
     "detector": "spectral_spike",
     "models": {MODEL: {LAYER: {"sigma2", "spike_threshold", "frames", "dim"?}}},  # the live spike detector
     "tap": {"window", "stride", "proj_dim", "layers"},     # the tap settings it was made with (calibrate)
     "model_fingerprint": {...},                           # which model (calibrate; `score` checks it)
     "offline": {...},                                     # every offline detector's state (calibrate)
     "risk": {"model_sha256", "alert_high", "clear_low", "far"},   # live EigenTrack thresholds
     "drift": {"version", "every", "sample", "persist", "margin",  # live drift detector (calibrate)
               "models": {MODEL: {LAYER: {"dim", "direction", "alert_deg", "clear_deg", "windows"}}}}}

`eigenwatch calibrate` writes every section; the sidecar's `--save-calibration`
writes the first three (what it learned from live frames). A layer's "dim" is
the MP n of the frames it was learned from (the row width, or the projected
width with EIGENWATCH_PROJ_DIM): the sidecar refuses frames of another width
for that layer rather than compare spectra of different shapes. Older files
without "tap" or "dim" still load (nothing to check then).

The "drift" section has its own version (DRIFT_VERSION; another one is refused
with the key and the fix): per layer the reference top direction of the
activation stream (base64 float32 [dim], unit norm, sign arbitrary) and the
principal angles, in degrees, above which the sidecar's drift detector alerts
(`alert_deg`, for `persist` consecutive windows of `every` tokens) and below
which it re-arms (`clear_deg`); monitor/offline/calibrate.py documents the rule.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import write_atomic

FORMAT = "eigenwatch.calibration/v1"
DRIFT_VERSION = 1


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names the flag, file and key."""


@dataclass
class LayerCalibration:
    """The spike detector's calibration of one (model, layer)."""

    sigma2: float  # noise variance relative to the window's mean eigenvalue
    spike_threshold: int  # alert when spikes > this
    frames: int = 0  # frames it was learned from (0: given)
    dim: int = 0  # MP n of those frames (0: not recorded)


@dataclass
class LayerDrift:
    """The drift detector's reference for one (model, layer)."""

    direction: np.ndarray  # [dim] float64, unit norm: the calibration stream's top direction
    alert_deg: float  # alert above this principal angle (degrees)
    clear_deg: float  # re-arm below it
    windows: int = 0  # calibration windows the thresholds came from


@dataclass
class DriftCalibration:
    every: int  # tokens per window the angles were measured on (the tap's EIGENWATCH_SKETCH_EVERY)
    sample: int  # one row in `sample` fed to the sketch (EIGENWATCH_SKETCH_SAMPLE)
    persist: int  # windows above alert_deg in a row before an alert
    layers: dict[tuple[str, int], LayerDrift] = field(default_factory=dict)
    margin: float = 1.5


@dataclass
class Calibration:
    path: str
    spike: dict[tuple[str, int], LayerCalibration] = field(default_factory=dict)
    tap: dict | None = None
    fingerprint: dict | None = None
    offline: dict | None = None
    risk: dict | None = None
    drift: DriftCalibration | None = None
    doc: dict = field(default_factory=dict)
    flag: str = "--calibration"  # the flag that named the file, for error messages

    def where(self, key: str = "") -> str:
        return f"{self.flag}: {self.path}" + (f": {key}" if key else "")

    def require_offline(self) -> dict:
        """The sections `eigenwatch score` needs, or an error saying the file is sidecar-only."""
        for key, sec in (("offline", self.offline), ("model_fingerprint", self.fingerprint)):
            if not isinstance(sec, dict):
                raise CalibrationError(f"{self.where()} has no {key!r} section: it was not written by "
                                       "`eigenwatch calibrate` (a sidecar-only calibration cannot score offline)")
        return self.offline

    def eigentrack_onnx(self) -> bytes | None:
        """The ONNX bytes of the EigenTrack GRU `eigenwatch calibrate` embedded (None if none)."""
        st = ((self.offline or {}).get("detectors") or {}).get("eigentrack")
        if not isinstance(st, dict) or not isinstance(st.get("onnx_base64"), str):
            return None
        try:
            return base64.b64decode(st["onnx_base64"], validate=True)
        except (binascii.Error, ValueError):
            raise CalibrationError(f"{self.where('offline.detectors.eigentrack.onnx_base64')} is not base64; "
                                   "recalibrate with `eigenwatch calibrate`") from None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _spike_section(models, where) -> dict[tuple[str, int], LayerCalibration]:
    if not isinstance(models, dict) or not models:
        raise CalibrationError(f"{where}: 'models' must map model names to layers")
    out: dict[tuple[str, int], LayerCalibration] = {}
    for model, layers in models.items():
        if not isinstance(layers, dict):
            raise CalibrationError(f"{where}: models.{model} must map layer indices to entries")
        for layer, entry in layers.items():
            at = f"{where}: models.{model}.{layer}"
            try:
                layer_i = int(layer)
            except ValueError:
                raise CalibrationError(f"{at}: layer must be an integer") from None
            if not isinstance(entry, dict):
                raise CalibrationError(f"{at} must be an object")
            sigma2, thr = entry.get("sigma2"), entry.get("spike_threshold")
            frames, dim = entry.get("frames", 0), entry.get("dim", 0)
            if not _number(sigma2) or sigma2 <= 0:
                raise CalibrationError(f"{at}.sigma2 must be a finite number > 0, got {sigma2!r}")
            for name, v in (("spike_threshold", thr), ("frames", frames), ("dim", dim)):
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise CalibrationError(f"{at}.{name} must be an integer >= 0, got {v!r}")
            out[(str(model), layer_i)] = LayerCalibration(float(sigma2), thr, frames, dim)
    return out


def _risk_section(sec, where) -> dict:
    where = f"{where}: risk"
    if not isinstance(sec, dict):
        raise CalibrationError(f"{where}: expected an object with model_sha256, alert_high, clear_low, far")
    sha = sec.get("model_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise CalibrationError(f"{where}.model_sha256: expected the risk model's SHA-256 (64 hex digits), got {sha!r}")
    out = {"model_sha256": sha.lower()}
    for key in ("alert_high", "clear_low", "far"):
        v = sec.get(key)
        if not _number(v) or not (0 <= v <= 1 if key == "far" else 0 < v < 1):
            accepted = "[0, 1]" if key == "far" else "(0, 1)"
            raise CalibrationError(f"{where}.{key}: expected a number in {accepted}, got {v!r}")
        out[key] = float(v)
    return out


def _tap_section(sec, where) -> dict:
    where = f"{where}: tap"
    if not isinstance(sec, dict):
        raise CalibrationError(f"{where}: expected an object with window, stride, proj_dim, layers")
    for key, lo in (("window", 2), ("stride", 1), ("proj_dim", 0)):
        v = sec.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise CalibrationError(f"{where}.{key}: expected an integer >= {lo}, got {v!r}")
    layers = sec.get("layers")
    if not isinstance(layers, list) or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
        raise CalibrationError(f"{where}.layers: expected a list of layer indices, got {layers!r}")
    return dict(sec)


def _positive_int(v, lo: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _drift_section(sec, where) -> DriftCalibration:
    where = f"{where}: drift"
    if not isinstance(sec, dict):
        raise CalibrationError(f"{where}: expected an object with version, every, sample, persist, models")
    if sec.get("version") != DRIFT_VERSION:
        raise CalibrationError(f"{where}.version: {sec.get('version')!r} is not supported (expected "
                               f"{DRIFT_VERSION}); recalibrate with this version's `eigenwatch calibrate`")
    for key in ("every", "sample", "persist"):
        if not _positive_int(sec.get(key)):
            raise CalibrationError(f"{where}.{key}: expected an integer >= 1, got {sec.get(key)!r}")
    margin = sec.get("margin", 1.5)
    if not _number(margin) or margin < 1:
        raise CalibrationError(f"{where}.margin: expected a number >= 1, got {margin!r}")
    out = DriftCalibration(sec["every"], sec["sample"], sec["persist"], margin=float(margin))
    models = sec.get("models")
    if not isinstance(models, dict):
        raise CalibrationError(f"{where}.models: expected {{model: {{layer: entry}}}}, got {type(models).__name__}")
    for model, layers in models.items():
        if not isinstance(layers, dict):
            raise CalibrationError(f"{where}.models.{model}: expected {{layer: entry}}")
        for layer, e in layers.items():
            at = f"{where}.models.{model}.{layer}"
            try:
                layer_i = int(layer)
            except ValueError:
                raise CalibrationError(f"{at}: layer must be an integer") from None
            if not isinstance(e, dict):
                raise CalibrationError(f"{at}: expected an object with dim, direction, alert_deg, clear_deg")
            dim = e.get("dim")
            if not _positive_int(dim):
                raise CalibrationError(f"{at}.dim: expected an integer >= 1, got {dim!r}")
            try:
                raw = base64.b64decode(e.get("direction", ""), validate=True)
            except (binascii.Error, ValueError, TypeError):
                raise CalibrationError(f"{at}.direction: expected base64 float32 [dim]; recalibrate") from None
            if len(raw) != 4 * dim:
                raise CalibrationError(f"{at}.direction: {len(raw)} bytes, expected {4 * dim} (float32 × dim {dim})")
            vec = np.frombuffer(raw, dtype="<f4").astype(np.float64)
            norm = float(np.linalg.norm(vec)) if np.isfinite(vec).all() else float("nan")
            if not abs(norm - 1) < 1e-3:
                raise CalibrationError(f"{at}.direction: expected a finite unit vector, got norm {norm:.6g}")
            alert, clear = e.get("alert_deg"), e.get("clear_deg")
            for key, v in (("alert_deg", alert), ("clear_deg", clear)):
                if not _number(v) or not 0 <= v <= 90:
                    raise CalibrationError(f"{at}.{key}: expected an angle in [0, 90] degrees, got {v!r}")
            if not clear < alert:
                raise CalibrationError(f"{at}: clear_deg ({clear}) must be below alert_deg ({alert}): the angle "
                                       "must fall below it to re-arm an alert raised above alert_deg")
            windows = e.get("windows", 0)
            if not _positive_int(windows, 0):
                raise CalibrationError(f"{at}.windows: expected an integer >= 0, got {windows!r}")
            out.layers[(str(model), layer_i)] = LayerDrift(vec / norm, float(alert), float(clear), windows)
    return out


def drift_section(drift: DriftCalibration) -> dict:
    """The "drift" section of a document (directions as base64 float32)."""
    models: dict[str, dict] = {}
    for (model, layer), d in sorted(drift.layers.items()):
        vec = np.asarray(d.direction, dtype="<f4")
        models.setdefault(model, {})[str(layer)] = {
            "dim": int(vec.shape[0]), "direction": base64.b64encode(vec.tobytes()).decode("ascii"),
            "alert_deg": float(d.alert_deg), "clear_deg": float(d.clear_deg), "windows": int(d.windows)}
    return {"version": DRIFT_VERSION, "every": drift.every, "sample": drift.sample, "persist": drift.persist,
            "margin": drift.margin, "models": models}


def load(path: str | Path, flag: str = "--calibration") -> Calibration:
    """Read and check a calibration file; errors name the flag, the file and the key."""
    path = Path(path)
    where = f"{flag}: {path}"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"{flag}: no such file {str(path)!r}") from None
    except OSError as exc:
        raise CalibrationError(f"{flag}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{where} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CalibrationError(f"{where}: 'format' must be {FORMAT!r}")
    cal = Calibration(path=str(path), spike=_spike_section(doc.get("models"), where), doc=doc, flag=flag)
    if "tap" in doc:
        cal.tap = _tap_section(doc["tap"], where)
    if "risk" in doc:
        cal.risk = _risk_section(doc["risk"], where)
    if "drift" in doc:
        cal.drift = _drift_section(doc["drift"], where)
    if isinstance(doc.get("offline"), dict):
        cal.offline = doc["offline"]
    if isinstance(doc.get("model_fingerprint"), dict):
        cal.fingerprint = doc["model_fingerprint"]
    return cal


def spike_models(spike: dict[tuple[str, int], LayerCalibration]) -> dict:
    """The "models" section for per-layer spike calibrations."""
    models: dict[str, dict[str, dict]] = {}
    for (model, layer), c in sorted(spike.items()):
        entry = {"sigma2": c.sigma2, "spike_threshold": c.spike_threshold, "frames": c.frames}
        if c.dim:
            entry["dim"] = c.dim
        models.setdefault(model, {})[str(layer)] = entry
    return models


def document(spike: dict[tuple[str, int], LayerCalibration], **sections) -> dict:
    """A whole calibration document: the spike section plus any of tap,
    model_fingerprint, offline, risk, drift (a DriftCalibration or its dict; None values are left out)."""
    doc = {"format": FORMAT, "detector": "spectral_spike", "models": spike_models(spike)}
    if isinstance(sections.get("drift"), DriftCalibration):
        sections["drift"] = drift_section(sections["drift"])
    doc.update({k: v for k, v in sections.items() if v is not None})
    return doc


def merged(saved: Calibration | None, spike: dict[tuple[str, int], LayerCalibration]) -> dict:
    """The document a sidecar's --save-calibration writes: what the file held when the sidecar
    started (`saved`: every section, and the layers this run has not learned) with this run's
    layers over it, so a restart adds to what earlier runs learned instead of replacing it."""
    if saved is None:
        return document(spike)
    doc = dict(saved.doc)
    doc["models"] = spike_models({**saved.spike, **spike})
    return doc


def load_for_saving(path: str | Path) -> Calibration | None:
    """The calibration already at a --save-calibration path (None when there is no file yet).
    A file there that is not a calibration raises CalibrationError: it is not overwritten."""
    if not Path(path).exists():
        return None
    try:
        return load(path, flag="--save-calibration")
    except CalibrationError as exc:
        raise CalibrationError(f"{exc}; the sidecar adds what it learns to this file and will not overwrite "
                               "something else: move it away or pick another path") from None


def save(path: str | Path, doc: dict) -> Path:
    """Write atomically (monitor/files.py: temporary file, fsync, rename, fsync of the folder):
    old file or new, never a torn one. Blocking: the sidecar calls it on a worker thread."""
    return write_atomic(path, json.dumps(doc))
