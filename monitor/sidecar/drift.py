"""The drift detector: per (model, layer), the principal angle between the top direction of the tap's latest
window (a DirectionSnapshot) and the reference `eigenwatch calibrate` stored in CALIB.json; alerts with hysteresis.

One snapshot per layer every `every` tokens of the whole stream (all requests): the alert is about the
traffic or the model, not a request, so it carries no request id (Alert.request_id is empty). Policy
(alerts.Hysteresis, as EigenTrack risk): angle > alert_deg for `persist` snapshots in a row raises one
warning; none again until the angle falls below clear_deg. Only direction vectors reach the sidecar.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from eigenwatch.kernels.sketch import principal_angle_degrees
from eigenwatch.monitor.calibration import DriftCalibration

from .alerts import WARNING, Hysteresis

log = logging.getLogger("eigenwatch.sidecar.drift")

DETECTOR = "drift"
MAX_DIM = 1 << 16  # widest row a snapshot may carry
MAX_K = 64  # most directions per snapshot
_MAX_LOG_KEYS = 1024


@dataclass
class StreamState:
    """One (model, layer) stream; quacks like a RequestState for AlertHub (empty request ids)."""

    model: str
    layer: int
    request_id: str = ""
    engine_request_id: str = ""
    alerts: list = field(default_factory=list)  # the last alerts raised (AlertHub caps the list)
    streak: int = 0  # consecutive snapshots above alert_deg
    alerted: bool = False  # raised and not yet re-armed
    snapshots: int = 0
    angle: float = math.nan  # the last angle (degrees)


def validate_snapshot(s) -> tuple[str, str] | None:
    """(field, problem) for a malformed DirectionSnapshot, None when it is fine."""
    if not s.model:
        return "model", "must not be empty"
    if s.layer < 0:
        return "layer", f"must be >= 0, got {s.layer}"
    if not 1 <= s.dim <= MAX_DIM:
        return "dim", f"must be in [1, {MAX_DIM}], got {s.dim}"
    if not 1 <= s.k <= min(MAX_K, s.dim):
        return "k", f"must be in [1, min({MAX_K}, dim)], got {s.k}"
    if s.tokens_seen < s.window_tokens or s.window_tokens < 1:
        return "window_tokens", f"must be in [1, tokens_seen={s.tokens_seen}], got {s.window_tokens}"
    if not 1 <= s.rows <= s.window_tokens:
        return "rows", f"must be in [1, window_tokens={s.window_tokens}], got {s.rows}"
    if len(s.directions) != 4 * s.k * s.dim:
        return "directions", (f"has {len(s.directions)} bytes but k={s.k} × dim={s.dim} needs "
                              f"{4 * s.k * s.dim} (float32 [k × dim])")
    v = directions(s)
    if not np.isfinite(v).all():
        return "directions", "contains NaN or Inf"
    norms = np.linalg.norm(v, axis=1)
    if not np.all(np.abs(norms - 1) < 1e-2):
        return "directions", f"rows must be unit vectors, got norms {np.round(norms, 4).tolist()}"
    return None


def directions(s) -> np.ndarray:
    """[k, dim] float64 from a snapshot's packed float32."""
    return np.frombuffer(s.directions, dtype="<f4").reshape(s.k, s.dim).astype(np.float64)


class DriftMonitor:
    """Angles and drift alerts for every (model, layer) that has a reference in `calibration`."""

    def __init__(self, calibration: DriftCalibration | None, metrics, alerts):
        self.cal = calibration
        self.metrics = metrics
        self.alerts = alerts
        self.streams: dict[tuple[str, int], StreamState] = {}
        self._policy: dict[tuple[str, int], Hysteresis] = {}
        self._logged: set = set()
        if calibration is not None:
            for (model, layer), ref in calibration.layers.items():
                self._policy[(model, layer)] = Hysteresis(ref.alert_deg, ref.clear_deg, calibration.persist)
                metrics.drift_threshold.labels(model, str(layer), "alert").set(ref.alert_deg)
                metrics.drift_threshold.labels(model, str(layer), "clear").set(ref.clear_deg)

    def observe(self, s) -> float | None:
        """One valid snapshot: the angle to the reference (degrees), or None when there is no usable one."""
        key = (s.model, int(s.layer))
        label = str(s.layer)
        ref = self.cal.layers.get(key) if self.cal is not None else None
        if ref is None:
            self.metrics.direction_snapshots.labels(s.model, label, "no_reference").inc()
            self._log_once(("noref", key), "direction snapshots of %s layer %d have no drift reference in "
                           "--calibration (run `eigenwatch calibrate` on reference texts): no angle", *key)
            return None
        if ref.direction.shape[0] != s.dim:
            self.metrics.direction_snapshots.labels(s.model, label, "dim_mismatch").inc()
            self._log_once(("dim", key), "direction snapshots of %s layer %d have dim %d but the drift reference "
                           "has %d: recalibrate for this model", s.model, s.layer, s.dim, ref.direction.shape[0])
            return None
        if s.window_tokens != self.cal.every:
            # Another window size is another noise level: the calibrated angles would not apply.
            self.metrics.direction_snapshots.labels(s.model, label, "window_mismatch").inc()
            self._log_once(("every", key), "direction snapshots of %s layer %d cover %d tokens but the drift "
                           "calibration used windows of %d: set EIGENWATCH_SKETCH_EVERY=%d on the tap or "
                           "recalibrate with --drift-every %d", s.model, s.layer, s.window_tokens, self.cal.every,
                           self.cal.every, s.window_tokens)
            return None
        angle = principal_angle_degrees(directions(s)[0], ref.direction)
        st = self.streams.get(key)
        if st is None:
            st = self.streams[key] = StreamState(s.model, int(s.layer))
        st.snapshots += 1
        st.angle = angle
        self.metrics.direction_snapshots.labels(s.model, label, "compared").inc()
        self.metrics.top_direction_angle.labels(s.model, label).set(angle)
        event = self._policy[key].step(st, angle)
        if event == "raise":
            self.metrics.drift_alerted.labels(s.model, label).set(1)
            self.alerts.raise_alert(
                st, DETECTOR, WARNING, angle, ref.alert_deg,
                f"top direction of layer {s.layer} at {angle:.1f}° from the calibrated reference, above "
                f"{ref.alert_deg:.1f}° for {self.cal.persist} window(s) of {self.cal.every} tokens (no new alert "
                f"until it falls below {ref.clear_deg:.1f}°)", int(s.layer), int(s.tokens_seen))
        elif event == "clear":
            self.metrics.drift_alerted.labels(s.model, label).set(0)
        return angle

    def _log_once(self, key, msg: str, *args) -> None:
        if key in self._logged or len(self._logged) >= _MAX_LOG_KEYS:
            return
        self._logged.add(key)
        log.warning(msg, *args)
