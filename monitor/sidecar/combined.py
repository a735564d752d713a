"""The combined score live: the same p-value `eigenwatch score` gives a text, for
every request the sidecar sees, from the same calibration file (--calibration
CALIB.json written by `eigenwatch calibrate`).

The combined score (monitor/combined.py) is a conformal p-value over one voter
per source of evidence. Live, each voter's value comes from where the request's
evidence is:

- token_mahalanobis, hidden_mahalanobis, llmcheck_hidden, token_probe: the tap
  computes them against the same file's Gaussians and probe (hooks/hidden.py,
  EIGENWATCH_CALIBRATION) and sends a few numbers per layer on the request's
  final frames (Frame.hidden); here they are averaged over the detector's
  layers exactly as the offline detectors do (the probe reads one layer);
- eigentrack: the largest logit over the request's steps of the GRU the sidecar
  already runs (sidecar/risk.py), which must be the calibration's own GRU
  (checked by its sha256).

When a request's final frames have brought every voter's value, its p-value
is computed once: GetReport shows it (Report.combined, final = true) and
`eigenwatch_combined_score` observes −log10 p; p < the calibration's
alert_far raises one `combined` alert (severity warning, layer −1). A request
whose values never all arrive (a tap without the calibration, a rejected
frame, statistics made against another file) is counted by reason in
`eigenwatch_combined_requests_total{result}` and gets no score, never a
wrong one. During generation, the request's other frames carry running
statistics over the rows so far: GetReport then shows a running value
(final = false) with LLM-Check, which only the final frame brings, counted as
no evidence (p = 1). It is a number to watch, not a calibrated test: it never
alerts and is not observed in the metric (the calibration scored whole texts,
and looking many times would inflate the false-alarm rate). Everything is
numpy on the event loop: per request a few floats per frame and one p-value
per batch that changed it.

Voters this sidecar cannot compute live (descriptor_mahalanobis and
spectral_spike: only when the calibration has no GRU) turn the combined score
off with a log line saying how to get it (`calibrate` with its GRU).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from prometheus_client import Counter, Histogram

from eigenwatch.kernels.hidden_stats import LinearProbe, calibration_id, middle_layer
from eigenwatch.monitor.calibration import Calibration
from eigenwatch.monitor.combined import Combined
from eigenwatch.monitor.llmcheck import LLMCheckHidden
from eigenwatch.v1 import monitor_pb2

from .alerts import WARNING

log = logging.getLogger("eigenwatch.sidecar.combined")

DETECTOR = "combined"
HIDDEN = {"token_mahalanobis": "token", "hidden_mahalanobis": "pooled", "llmcheck_hidden": "llmcheck",
          "token_probe": "probe_logit"}
LIVE_VOTERS = set(HIDDEN) | {"eigentrack"}
# −log10 p: 1 = p 0.1, 2 = p 0.01, … (p ≥ 1/(n + 1) for n calibration texts)
SCORE_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.3, 1.5, 2.0, 2.5, 3.0, 4.0)


class CombinedSetupError(ValueError):
    pass


class RequestCombined:
    """What one request's final frames brought: {layer: (rows, token, pooled, llmcheck, probe)}, or
    {layer: reason} for statistics it cannot use ("other_calibration", "invalid"); and the
    latest running values of its other frames, {layer: (rows, token, pooled, None, probe)}."""

    __slots__ = ("hidden", "running", "done", "report")

    def __init__(self):
        self.hidden: dict[int, tuple] = {}
        self.running: dict[int, tuple] = {}
        self.done = False
        self.report: monitor_pb2.CombinedReport | None = None


class LiveCombined:
    def __init__(self, cal: Calibration, risk, alerts, metrics):
        off = cal.offline or {}
        dets = off.get("detectors") or {}
        try:
            self.combined = Combined.from_state(off["combined"])
            self.far = float(off["alert_far"])
            self.layers = tuple(int(l) for l in off["layers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CombinedSetupError(f"{cal.where('offline')}: no usable combined score ({exc!r}); recalibrate "
                                     "with `eigenwatch calibrate`") from None
        self.voters = tuple(self.combined.names)
        offline_only = sorted(set(self.voters) - LIVE_VOTERS)
        if offline_only:
            raise CombinedSetupError(
                f"{cal.where('offline.combined')}: its voter(s) {', '.join(offline_only)} are computed offline only; "
                "calibrate with the EigenTrack GRU (the default --risk-model auto) for a live combined score")
        self.model = str((cal.fingerprint or {}).get("name") or "")
        self.cal_id = calibration_id(dets)
        self.token_layers = tuple(sorted(int(l) for l in dets.get("token_mahalanobis", {}).get("layers", {})))
        self.pooled_layers = tuple(sorted(int(l) for l in dets.get("hidden_mahalanobis", {}).get("layers", {})))
        self.llm = LLMCheckHidden.from_state(dets["llmcheck_hidden"]) if "llmcheck_hidden" in self.voters else None
        self.llm_layer = middle_layer(self.layers)
        self.probe_layer = None
        if "token_probe" in self.voters:
            try:
                self.probe_layer = LinearProbe.from_state(dets.get("token_probe"),
                                                          cal.where("offline.detectors.token_probe")).layer
            except ValueError as exc:
                raise CombinedSetupError(f"{exc}; recalibrate with `eigenwatch calibrate`") from None
        self.risk = None
        if "eigentrack" in self.voters:
            want = (dets.get("eigentrack") or {}).get("sha256")
            if risk is None or risk.model.sha256 != want:
                raise CombinedSetupError(
                    "the combined score's eigentrack voter needs the calibration's own GRU: leave --risk-model "
                    f"unset (it is embedded in {cal.path}) or pass the same model (sha256 {str(want)[:12]}…)")
            self.risk = risk
        self._touched: dict[int, object] = {}  # requests whose running values changed in this batch
        self.needed_running = set(self.token_layers) | set(self.pooled_layers) | (
            {self.probe_layer} if self.probe_layer is not None else set())
        self.needed = set(self.needed_running)
        if self.llm is not None:
            self.needed.add(self.llm_layer)
        self.alerts = alerts
        reg = metrics.registry
        self.m_score = Histogram("eigenwatch_combined_score", "Combined score (−log10 p) of each request scored "
                                 "live, against the calibration texts", ["model"], buckets=SCORE_BUCKETS, registry=reg)
        self.m_requests = Counter(
            "eigenwatch_combined_requests",
            "Requests that finished, by what the combined score made of them: scored (p >= alert_far), alert, "
            "or why none was computed (no_statistics: no final frame carried the tap's hidden-state statistics; "
            "other_calibration: made against another file; invalid: non-finite; partial: they cover other rows "
            "than the frames; incomplete: some layer's are missing)",
            ["model", "result"], registry=reg)
        log.info("combined score live for model %r from %s: voters %s, alert at p < %g", self.model, cal.path,
                 ", ".join(self.voters), self.far)

    # ---- per frame -----------------------------------------------------------------------
    def observe(self, st, f: monitor_pb2.Frame) -> None:
        """A frame of request state `st` that carried hidden-state statistics."""
        if f.model != self.model:
            return
        h = f.hidden
        rc = st.combined
        if rc is None:
            rc = st.combined = RequestCombined()
        if not f.final:
            if not rc.done and h.calibration == self.cal_id and h.rows > 0 and self._finite(f.layer, h, False):
                rc.running[f.layer] = (h.rows, h.token_sqdist, h.pooled_sqdist, None,
                                       h.probe_logit if h.HasField("probe_logit") else None)
                self._touched[id(st)] = st
            return
        if h.calibration != self.cal_id:
            rc.hidden[f.layer] = "other_calibration"  # made against another file: never combined
            return
        if h.rows != f.token_count:  # the tap's sums missed rows its windows saw (or the reverse)
            rc.hidden[f.layer] = "partial"
            return
        vals = (h.rows, h.token_sqdist, h.pooled_sqdist, h.llmcheck if h.HasField("llmcheck") else None,
                h.probe_logit if h.HasField("probe_logit") else None)
        if not (h.rows > 0 and self._finite(f.layer, h, True)):
            rc.hidden[f.layer] = "invalid"
            return
        rc.hidden[f.layer] = vals

    def flush_running(self) -> None:
        """The running value of every request whose frames brought new running statistics in
        this batch, once all its layers have some at the same row count (a step's frames
        come together): GetReport's `combined` with final = false, no alert, no metric."""
        touched, self._touched = self._touched, {}
        for st in touched.values():
            rc = st.combined
            if rc is None or rc.done:
                continue
            have = rc.running
            if any(l not in have for l in self.needed_running) or \
                    len({have[l][0] for l in self.needed_running}) != 1:
                continue
            values = self._values(st, rc, have, running=True)
            p = float(self.combined.p_values({k: np.array([v]) for k, v in values.items()})[0])
            rows = next(iter(have.values()))[0]
            rc.report = monitor_pb2.CombinedReport(p_value=p, score=-math.log10(p), alert=False, alert_far=self.far,
                                                   detectors=values, final=False, rows=rows)

    def _finite(self, layer: int, h, final: bool) -> bool:
        """The values this calibration reads from `layer` are finite (a layer without a token or
        pooled Gaussian has NaN there, which nothing reads)."""
        return ((layer not in self.token_layers or math.isfinite(h.token_sqdist))
                and (layer not in self.pooled_layers or math.isfinite(h.pooled_sqdist))
                and (not final or not h.HasField("llmcheck") or math.isfinite(h.llmcheck))
                and (not h.HasField("probe_logit") or math.isfinite(h.probe_logit)))

    # ---- per finished request ----------------------------------------------------------
    def finish(self, st) -> None:
        """The request's final frames are in (call after risk.flush/finish for the batch)."""
        if st.model != self.model:
            return
        rc = st.combined
        if rc is None:
            rc = st.combined = RequestCombined()
        if rc.done:
            return
        rc.done = True
        why = self._missing(rc)
        if why is not None:
            self.m_requests.labels(st.model, why).inc()
            return
        values = self._values(st, rc, rc.hidden)
        p = float(self.combined.p_values({k: np.array([v]) for k, v in values.items()})[0])
        score = -math.log10(p)
        alert = p < self.far
        rc.running.clear()
        rc.report = monitor_pb2.CombinedReport(p_value=p, score=score, alert=alert, alert_far=self.far,
                                               detectors=values, final=True,
                                               rows=max(v[0] for v in rc.hidden.values()))
        self.m_score.labels(st.model).observe(score)
        self.m_requests.labels(st.model, "alert" if alert else "scored").inc()
        if alert:
            tokens = max(v[0] for v in rc.hidden.values())
            self.alerts.raise_alert(
                st, DETECTOR, WARNING, score, -math.log10(self.far),
                f"combined p-value {p:.2g} below the calibrated false-alarm rate {self.far:g} ("
                + ", ".join(f"{k} {v:.3g}" for k, v in values.items()) + ")", -1, int(tokens))

    def _missing(self, rc: RequestCombined) -> str | None:
        have = rc.hidden
        if not have:
            return "no_statistics"
        bad = [v for v in have.values() if isinstance(v, str)]
        if bad:
            return bad[0]
        if any(l not in have for l in self.needed):
            return "incomplete"
        if self.llm is not None and have[self.llm_layer][3] is None:
            return "incomplete"
        if self.probe_layer is not None and have[self.probe_layer][4] is None:
            return "incomplete"  # a tap that loaded a file without the probe, or an older tap
        return None

    def _values(self, st, rc: RequestCombined, h: dict, running: bool = False) -> dict[str, float]:
        """Each voter's raw value, as the offline detector computes it (monitor/mahalanobis.py, llmcheck.py,
        eigentrack.py); running: LLM-Check is left out (no evidence until the final frame)."""
        out = {}
        for name in self.voters:
            if running and name == "llmcheck_hidden":
                continue
            if name == "token_mahalanobis":
                out[name] = float(np.mean([h[l][1] for l in self.token_layers]))
            elif name == "hidden_mahalanobis":
                out[name] = float(np.mean([h[l][2] for l in self.pooled_layers]))
            elif name == "llmcheck_hidden":
                out[name] = float(self.llm.score([{"llmcheck": h[self.llm_layer][3]}])[0])
            elif name == "token_probe":
                if h[self.probe_layer][4] is not None:  # running: a frame without it is no evidence yet
                    out[name] = float(h[self.probe_layer][4])
            elif name == "eigentrack":
                rr = st.risk
                out[name] = float(rr.max_logit) if rr is not None and rr.steps else 0.0
        return out


def live_combined(cfg, risk, alerts, metrics) -> LiveCombined | None:
    """The sidecar's LiveCombined for --calibration, or None: no calibration, one without
    an offline section (a sidecar-only file), or one whose combined score cannot be
    computed live here (logged with what to do; the other detectors run as before)."""
    if not cfg.calibration:
        return None
    from eigenwatch.monitor import calibration as calib

    cal = calib.load(cfg.calibration)
    if not cal.offline:
        return None
    try:
        return LiveCombined(cal, risk, alerts, metrics)
    except CombinedSetupError as exc:
        log.warning("no live combined score: %s", exc)
        return None
