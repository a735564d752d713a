"""Live EigenTrack risk in the sidecar (`eigenwatch sidecar --risk-model model.onnx`).

Per request, frames are grouped by token count. When every layer the risk
model reads has a frame at one token count, that is one time step: x_t =
eigentrack.step_vector(...) — the function `eigenwatch extract` uses offline, here
as step_matrix, many steps at once —
with each frame's descriptors reordered from the batch's descriptor_names into
the model's, and the request's GRU state advances one step (eigentrack.RiskModel.step).

Batching: the steps that became ready in one ingested FrameBatch are scored
together, in rounds: round k holds the k-th ready step of every request, stacked
into ONE onnxruntime call ([B, F], [B, H]). A decode step brings at most one new
step per request, so a batch costs one call; only a request whose batch carries
several of its token counts (a prefill spanning strides) needs more, because
its step k+1 needs the state after step k.

Offline equality: live risk equals RiskModel.sequence(x) on the request's
eigentrack.frames_to_sequence(...) rows, step for step. Frames at a token count that was
already scored are the tap's final frame repeating its last window (same rows,
same descriptors) and are ignored; a step whose layers never all arrive is
dropped once a later step completes, as frames_to_sequence drops it.

Alerting (detector "eigentrack", severity warning) with hysteresis
(sidecar/alerts.py): an alert when risk > high for `persist` consecutive
steps; then no new alert for that request until risk < low. There is no critical
level: the model's output is a single calibrated probability, and its
calibration (`eigenwatch calibrate --risk-model`) yields one operating point.

Never fatal: a failing or non-finite model call is counted
(eigenwatch_risk_errors_total), logged (rate-limited) and skipped; ingest goes on.

Memory per request: the GRU state (H float32) while it runs, at most
MAX_PENDING_STEPS incomplete steps, and a risk history of --report-history
steps. State lives in the request's RequestState, so it goes when the request
is evicted; the GRU state and pending steps go as soon as the request finishes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from eigenwatch.monitor.calibration import Calibration, CalibrationError
from eigenwatch.monitor.eigentrack import NAME as DETECTOR
from eigenwatch.monitor.eigentrack import RiskModel, RiskModelError, step_matrix
from eigenwatch.v1 import monitor_pb2

from .alerts import WARNING, Hysteresis
from .state import History

log = logging.getLogger("eigenwatch.sidecar.risk")

DEFAULT_HIGH, DEFAULT_LOW = 0.9, 0.7
# Token counts a request may have waiting for their other layers. The tap sends
# all layers of one engine step in one message, so more than a couple means a
# layer is missing for good; the oldest is then dropped (reason "incomplete").
MAX_PENDING_STEPS = 8
_ERROR_LOG_EVERY_S = 60.0
_MAX_LOG_KEYS = 1024


class LiveRiskError(ValueError):
    """A risk-model setting that cannot be used; the message names the flag."""


@dataclass(frozen=True)
class RiskThresholds:
    high: float = DEFAULT_HIGH
    low: float = DEFAULT_LOW
    persist: int = 1
    calibrated: bool = False  # high/low came from a calibration file made for this model
    far: float = 0.0  # false-alarm rate the calibration measured at `high` (0: unknown)


def check_thresholds(high: float, low: float, persist: int, high_from: str = "--risk-high",
                     low_from: str = "--risk-low") -> None:
    for value, name in ((high, high_from), (low, low_from)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1):
            raise LiveRiskError(f"{name}: expected a probability in (0, 1), got {value!r}")
    if not low < high:
        raise LiveRiskError(f"{low_from} ({low}) must be below {high_from} ({high}): risk must fall below the low "
                            "threshold to re-arm an alert raised above the high one")
    if persist < 1:
        raise LiveRiskError(f"--risk-persist: expected an integer >= 1, got {persist}")


def resolve_thresholds(model_sha256: str, calibration: Calibration | None, high: float | None,
                       low: float | None, persist: int) -> RiskThresholds:
    """Flags override the calibration file's risk section, which overrides the defaults.
    A risk section made for another model file is refused (its thresholds mean nothing here)."""
    sec = calibration.risk if calibration is not None else None
    if sec is not None and sec["model_sha256"] != model_sha256.lower():
        raise LiveRiskError(
            f"{calibration.where('risk.model_sha256')} {sec['model_sha256'][:12]}… was calibrated for "
            f"another risk model than --risk-model (sha256 {model_sha256[:12]}…); re-run "
            "`eigenwatch calibrate --risk-model` with this model, or pass the matching model file")
    cal_high = sec["alert_high"] if sec else None
    cal_low = sec["clear_low"] if sec else None
    h = high if high is not None else (cal_high if cal_high is not None else DEFAULT_HIGH)
    l = low if low is not None else (cal_low if cal_low is not None else DEFAULT_LOW)
    src = {True: "--calibration risk.", False: "default "}
    check_thresholds(h, l, persist,
                     "--risk-high" if high is not None else src[sec is not None] + "alert_high",
                     "--risk-low" if low is not None else src[sec is not None] + "clear_low")
    calibrated = sec is not None and high is None and low is None
    return RiskThresholds(h, l, persist, calibrated, sec["far"] if calibrated else 0.0)


@dataclass
class LiveRiskSetup:
    model: object  # risk.RiskModel
    thresholds: RiskThresholds


def load_live_risk(cfg, calibration: Calibration | None) -> LiveRiskSetup | None:
    """The risk model and thresholds for a SidecarConfig (None without a risk model:
    no --risk-model and no GRU embedded in the calibration file). Raises
    LiveRiskError naming the flag; imports onnxruntime, never torch."""
    path = cfg.risk_model
    try:
        blob = calibration.eigentrack_onnx() if not path and calibration is not None else None
    except CalibrationError as exc:
        raise LiveRiskError(str(exc)) from None
    if not path and blob is None:
        given = [f for f, v in (("--risk-high", cfg.risk_high), ("--risk-low", cfg.risk_low)) if v is not None]
        if given:
            raise LiveRiskError(f"{given[0]}: needs --risk-model (the EigenTrack model it thresholds)")
        return None
    try:
        if blob is not None:  # the GRU `eigenwatch calibrate` trained travels inside CALIB.json
            path = f"{calibration.path} (offline.detectors.eigentrack)"
            model = RiskModel.from_bytes(blob, path)
        else:
            model = RiskModel.load(path)
    except RiskModelError as exc:
        raise LiveRiskError(f"--risk-model: {exc}") from None
    th = resolve_thresholds(model.sha256, calibration, cfg.risk_high, cfg.risk_low, cfg.risk_persist)
    log.info("risk model %s (sha256 %s…): model %s, layers %s, %d descriptors, hidden %d; "
             "alert above %.4g for %d step(s), re-arm below %.4g%s", path, model.sha256[:12], model.model,
             list(model.layers), len(model.descriptor_names), model.hidden_size, th.high, th.persist, th.low,
             f", calibrated (false-alarm rate {th.far:.4g})" if th.calibrated else "")
    if not th.calibrated:
        log.warning("the EigenTrack risk thresholds (high %.4g, low %.4g) are not calibrated for this model%s: "
                    "their false-alarm rate is unknown; run `eigenwatch calibrate --risk-model %s` and pass "
                    "--calibration", th.high, th.low,
                    " (set by flags)" if cfg.risk_high is not None or cfg.risk_low is not None else " (defaults)",
                    path)
    return LiveRiskSetup(model, th)


class RequestRisk:
    """One request's risk state (lives in its RequestState.risk)."""

    __slots__ = ("h", "pending", "last_count", "history", "current", "max", "max_logit", "steps", "alerted", "streak", "done")

    def __init__(self, history: int):
        self.h: np.ndarray | None = None  # [H] float32; None: the model's initial state
        self.pending: dict[int, dict[int, np.ndarray]] = {}  # token_count -> {layer: descriptors, model order}
        self.last_count = -1  # token count of the last step taken (scored or lost)
        self.history = History(history, 1, np.float64)
        self.current = 0.0
        self.max = 0.0
        self.max_logit = -math.inf  # the offline eigentrack detector's score (sidecar/combined.py)
        self.steps = 0
        self.alerted = False  # raised and not yet re-armed (risk has not fallen below low)
        self.streak = 0  # consecutive steps with risk > high
        self.done = False  # finished: no more steps


class LiveRisk:
    """Scores requests of one model with one RiskModel; see the module docstring.
    on_alert(state, risk, token_count) is called when an eigentrack alert is due."""

    def __init__(self, setup: LiveRiskSetup, metrics, history: int = 256,
                 max_pending: int = MAX_PENDING_STEPS, on_alert=None):
        m = self.model = setup.model
        self.th = setup.thresholds
        self.policy = Hysteresis(self.th.high, self.th.low, self.th.persist)
        self.layers = tuple(m.layers)
        self._layer_set = frozenset(self.layers)
        self.names = tuple(m.descriptor_names)
        self.history = history
        self.max_pending = max_pending
        self.on_alert = on_alert
        self._h0 = np.asarray(m.initial_state(1), dtype=np.float32)[0]
        self._index: dict[tuple[str, ...], np.ndarray | None] = {}
        self._touched: dict[str, object] = {}  # engine id -> RequestState, since the last flush
        self._logged: set = set()
        self._skipped: dict[tuple[str, str], object] = {}  # (model, reason) -> counter child
        self._last_error_log = -math.inf
        self._errors = 0
        self.metrics = metrics
        name = m.model
        # prometheus-client's .labels() takes a lock and a lookup: resolve children once.
        metrics.risk.touch(name)
        self._m_max = metrics.request_max_risk.labels(name)
        self._m_steps = metrics.risk_steps.labels(name)
        self._m_alerted = metrics.risk_alerted_requests.labels(name)
        self._m_errors = metrics.risk_errors.labels(name)
        metrics.risk_threshold.labels(name, "high").set(self.th.high)
        metrics.risk_threshold.labels(name, "low").set(self.th.low)

    # ---- ingest ------------------------------------------------------------------------
    def batch_index(self, names) -> np.ndarray | None:
        """Where each of the model's descriptors sits in a batch with these descriptor_names;
        None (and logged once) when some are missing: that batch gets no risk."""
        key = tuple(names)
        if key in self._index:
            return self._index[key]
        pos = {n: i for i, n in enumerate(key)}
        missing = [n for n in self.names if n not in pos]
        idx = None if missing else np.array([pos[n] for n in self.names], dtype=np.intp)
        if missing:
            self._log_once(("names", key), "frames without the risk model's descriptors %s get no risk "
                           "(the tap's descriptor version differs from the one the model was trained on)", missing)
        if len(self._index) < _MAX_LOG_KEYS:
            self._index[key] = idx
        return idx

    def add(self, st, model: str, layer: int, token_count: int, desc: np.ndarray, idx: np.ndarray | None) -> None:
        """One valid frame (model, layer, token_count) of request state `st`; desc [n_names]
        float64 in batch order."""
        if model != self.model.model:
            self._skip(model, "other_model")
            self._log_once(("model", model), "frames of model %r get no risk: the risk model was trained on "
                           "model %r", model, self.model.model)
            return
        if layer not in self._layer_set:
            return
        if idx is None:
            self._skip(model, "descriptor_names")
            return
        rr = st.risk
        if rr is None:
            rr = st.risk = RequestRisk(self.history)
        if rr.done:
            self._skip(model, "finished")
            return
        c = int(token_count)
        if c <= rr.last_count:
            # == : the final frame repeating the last window (already scored); < : arrived too late.
            if c < rr.last_count:
                self._skip(model, "out_of_order")
            return
        pend = rr.pending.get(c)
        if pend is None:
            if len(rr.pending) >= self.max_pending:
                n_layers = len(self.layers)
                if any(len(d) == n_layers for d in rr.pending.values()):
                    self.flush()  # complete steps waiting for the model call (the sidecar batches calls): now
                if len(rr.pending) >= self.max_pending:  # steps that never completed
                    self._skip(model, "incomplete", len(rr.pending.pop(min(rr.pending))))
            pend = rr.pending[c] = {}
        pend[layer] = desc[idx]
        self._touched[st.engine_request_id] = st

    def add_block(self, model: str, items: list, desc: np.ndarray, idx: np.ndarray | None) -> None:
        """`add` for the frames of one FrameColumns block at once: items [(state, layer,
        token_count, row)], desc [n, n_names] float64 in batch order. The model, layer and
        descriptor checks and the reordering into the model's descriptors run once per block."""
        if not items:
            return
        if model != self.model.model or idx is None:
            for st, layer, count, row in items:  # the per-frame path counts and logs the reason
                self.add(st, model, layer, count, desc[row], idx)
            return
        layer_set = self._layer_set
        items = [it for it in items if it[1] in layer_set]
        if not items:
            return
        x = desc[[it[3] for it in items]][:, idx]  # [m, model's descriptors], one gather for the block
        touched, max_pending, n_layers = self._touched, self.max_pending, len(self.layers)
        for k, (st, layer, c, _) in enumerate(items):
            rr = st.risk
            if rr is None:
                rr = st.risk = RequestRisk(self.history)
            if rr.done:
                self._skip(model, "finished")
                continue
            if c <= rr.last_count:  # as in `add`
                if c < rr.last_count:
                    self._skip(model, "out_of_order")
                continue
            pend = rr.pending.get(c)
            if pend is None:
                if len(rr.pending) >= max_pending:
                    if any(len(d) == n_layers for d in rr.pending.values()):
                        self.flush()
                    if len(rr.pending) >= max_pending:
                        self._skip(model, "incomplete", len(rr.pending.pop(min(rr.pending))))
                pend = rr.pending[c] = {}
            pend[layer] = x[k]  # a row of this block's gather: freed once the step is scored
            touched[st.engine_request_id] = st

    @property
    def waiting(self) -> int:
        """Requests with frames added since the last flush."""
        return len(self._touched)

    def flush(self) -> None:
        """Score every step that became complete since the last flush."""
        if not self._touched:
            return
        touched, self._touched = self._touched, {}
        queues = []  # (state, RequestRisk, [(token_count, {layer: descriptors}), ...] ascending)
        n_layers = len(self.layers)
        for st in touched.values():
            rr = st.risk
            if rr is None or rr.done or not rr.pending:
                continue
            pending = rr.pending
            if len(pending) == 1:  # the usual case under load: one step, waiting only for the call
                c, d = next(iter(pending.items()))
                if len(d) == n_layers:
                    pending.clear()
                    rr.last_count = c
                    queues.append((st, rr, [(c, d)]))
                continue
            ready = [c for c, d in pending.items() if len(d) == n_layers]
            if not ready:
                continue
            top = max(ready)
            steps = []
            for c in sorted(rr.pending):
                if c > top:
                    break
                d = rr.pending.pop(c)
                if len(d) == n_layers:
                    steps.append((c, d))
                else:  # a later step is complete: this one can never be (frames_to_sequence drops it too)
                    self._skip(st.model, "incomplete", len(d))
            rr.last_count = top
            queues.append((st, rr, steps))
        depth = max((len(s) for _, _, s in queues), default=0)
        failed: set[int] = set()
        for k in range(depth):
            items = [(st, rr, steps[k]) for st, rr, steps in queues if len(steps) > k and id(rr) not in failed]
            if items:
                failed |= self._score(items)

    def _score(self, items) -> set[int]:
        """One model call for items [(state, RequestRisk, (token_count, {layer: descriptors}))]: ids
        of the failed ones."""
        x = step_matrix([d for _, _, (_, d) in items], self.layers)  # [B, F]
        h = np.stack([self._h0 if rr.h is None else rr.h for _, rr, _ in items])  # [B, H]
        try:
            risk, logit, h_new = self.model.step_with_logit(x, h)
            risk = np.asarray(risk, dtype=np.float64).reshape(-1)
            logit = np.asarray(logit, dtype=np.float64).reshape(-1)
            h_new = np.asarray(h_new, dtype=np.float32)
            if risk.shape != (len(items),) or h_new.shape != h.shape:
                raise ValueError(f"the model returned risk {list(risk.shape)} and h {list(h_new.shape)} "
                                 f"for a batch of {len(items)}")
        except Exception as exc:  # an ORT failure must never break ingestion: count, log, go on
            self._model_error(len(items), exc)
            return {id(rr) for _, rr, _ in items}
        ok = np.isfinite(risk) & (risk >= 0) & (risk <= 1) & np.isfinite(h_new).all(axis=1)
        failed = set()
        if not ok.all():
            self._model_error(int((~ok).sum()), ValueError("non-finite or out-of-range risk / state"))
        risks, logits = risk.tolist(), logit.tolist()
        for i, (st, rr, (c, _)) in enumerate(items):
            if not ok[i]:
                failed.add(id(rr))
                continue
            rr.h = h_new[i].copy()  # a copy: a view would keep the whole batch array alive
            if logits[i] > rr.max_logit:
                rr.max_logit = logits[i]
            self._observe(st, rr, c, risks[i])
        self.metrics.risk.add(self.model.model, risk[ok])
        self._m_steps.inc(int(ok.sum()))
        return failed

    def _observe(self, st, rr: RequestRisk, count: int, r: float) -> None:
        rr.history.append(count, r)
        rr.current = r
        rr.max = r if rr.steps == 0 else max(rr.max, r)
        rr.steps += 1
        event = self.policy.step(rr, r)
        if event == "clear":  # re-armed: the next excursion above high alerts again
            self._m_alerted.dec()
        elif event == "raise":
            self._m_alerted.inc()
            if self.on_alert is not None:
                self.on_alert(st, r, count)

    def finish(self, st) -> None:
        """The request ended (final frame, idle sweep or eviction): free its model state,
        record its max risk once."""
        rr = st.risk
        if rr is None or rr.done:
            return
        if rr.pending:
            self._skip(st.model, "incomplete", sum(len(d) for d in rr.pending.values()))
            rr.pending.clear()
        rr.done = True
        rr.h = None
        if rr.steps:
            self._m_max.observe(rr.max)
        if rr.alerted:
            self._m_alerted.dec()

    # ---- report ------------------------------------------------------------------------
    def report(self, rr: RequestRisk) -> monitor_pb2.RiskReport:
        counts, values = rr.history.items()
        th = self.th
        return monitor_pb2.RiskReport(
            model_sha256=self.model.sha256, layers=self.layers, steps=rr.steps, current=rr.current, max=rr.max,
            alerted=rr.alerted, alert_high=th.high, clear_low=th.low, persist=th.persist, calibrated=th.calibrated,
            far=th.far,
            history=[monitor_pb2.RiskSample(token_count=int(c), risk=float(v)) for c, v in zip(counts, values[:, 0])],
        )

    def alert_message(self, r: float) -> str:
        th = self.th
        return (f"EigenTrack risk {r:.3f} above {th.high:g} for {th.persist} step(s) "
                f"(no new alert until it falls below {th.low:g})")

    # ---- bookkeeping -------------------------------------------------------------------
    def _skip(self, model: str, reason: str, n: int = 1) -> None:
        if not n:
            return
        child = self._skipped.get((model, reason))
        if child is None:
            child = self.metrics.risk_skipped.labels(model, reason)
            if len(self._skipped) < _MAX_LOG_KEYS:
                self._skipped[(model, reason)] = child
        child.inc(n)

    def _log_once(self, key, msg: str, *args) -> None:
        if key in self._logged or len(self._logged) >= _MAX_LOG_KEYS:
            return
        self._logged.add(key)
        log.warning(msg, *args)

    def _model_error(self, n: int, exc: Exception) -> None:
        self._errors += 1
        self._m_errors.inc()
        self._skip(self.model.model, "model_error", n * len(self.layers))
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.error("risk model call failed for %d step(s), skipped (%d failure(s) so far; logged at most "
                      "once a minute): %s", n, self._errors, exc, exc_info=self._errors == 1)
