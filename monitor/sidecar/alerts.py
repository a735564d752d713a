"""Alert policy in one place: severity levels and names (the proto enum), when
a detector's finding becomes an alert (persistence for spikes, hysteresis for
risk), and delivery (the request's record, the alerts counter, every
WatchAlerts subscriber; a slow subscriber loses its oldest alert, ingest never
waits, and one that takes nothing for --watcher-stall-s is disconnected; at most
--max-watchers subscribers at once).
"""

from __future__ import annotations

import asyncio
import time

import grpc

from eigenwatch.v1 import monitor_pb2

from .state import ALERT_BYTES

INFO, WARNING, CRITICAL = monitor_pb2.SEVERITY_INFO, monitor_pb2.SEVERITY_WARNING, monitor_pb2.SEVERITY_CRITICAL
SEVERITY_NAMES = {v: k.removeprefix("SEVERITY_").lower() for k, v in monitor_pb2.Severity.items() if v}
MAX_ALERTS_PER_REQUEST = 64  # kept in a request's report; the counter and watchers see every one
WATCH_QUEUE = 1024  # alerts a WatchAlerts subscriber may fall behind by
BATCH_ALERTS = 512  # most alerts in one WatchAlertBatches message


def severity_name(level: int) -> str:
    return SEVERITY_NAMES.get(level, str(level))


class Persistence:
    """A window detector (spectral_spike) alerts when its finding persists for
    `persist` consecutive windows of a layer — one odd window is not a finding —
    and once per request, layer and severity level (a critical after a warning
    is news; the tenth warning is not)."""

    def __init__(self, persist: int):
        if persist < 1:
            raise ValueError(f"persist: expected an integer >= 1, got {persist}")
        self.persist = persist

    def step(self, layer_state, fired: dict, key, severity: int) -> bool:
        """One window's severity (0: none); layer_state.over_streak and `fired`
        (key -> highest level raised) are updated. True: raise an alert now."""
        layer_state.over_streak = layer_state.over_streak + 1 if severity else 0
        if severity and layer_state.over_streak >= self.persist and severity > fired.get(key, 0):
            fired[key] = severity
            return True
        return False


class Hysteresis:
    """A running score (EigenTrack risk) alerts when it stays above `high` for
    `persist` consecutive steps, then not again until it falls below `low`
    (re-armed): a score oscillating between the two raises one alert per
    excursion, not one per crossing."""

    def __init__(self, high: float, low: float, persist: int = 1):
        if not low < high:
            raise ValueError(f"low ({low}) must be below high ({high})")
        if persist < 1:
            raise ValueError(f"persist: expected an integer >= 1, got {persist}")
        self.high, self.low, self.persist = high, low, persist

    def step(self, state, value: float) -> str | None:
        """state has .streak and .alerted. Returns "raise", "clear" (re-armed) or None."""
        state.streak = state.streak + 1 if value > self.high else 0
        if state.alerted:
            if value < self.low:
                state.alerted = False
                return "clear"
        elif state.streak >= self.persist:
            state.alerted = True
            return "raise"
        return None


class _Watcher:
    __slots__ = ("queue", "model", "detector", "min_severity", "dropped")

    def __init__(self, request: monitor_pb2.WatchAlertsRequest, size: int):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=size)
        self.model, self.detector, self.min_severity = request.model, request.detector, request.min_severity
        self.dropped = 0


class AlertHub:
    """Raises alerts: records them on the request, counts them, fans them out."""

    def __init__(self, metrics, max_watchers: int = 64, stall_s: float = 10.0, charge=None, queue_size: int = WATCH_QUEUE):
        self.metrics = metrics
        self.max_watchers = max_watchers
        self.stall_s = stall_s
        self.queue_size = queue_size
        self.charge = charge  # callback(request state, bytes) for the memory estimate
        self.watchers: dict[int, _Watcher] = {}
        self._counters: dict[tuple, object] = {}  # (model, detector, severity) -> eigenwatch_alerts_total child

    def raise_alert(self, st, detector: str, severity: int, value: float, threshold: float, message: str,
                    layer: int, token_count: int) -> monitor_pb2.Alert:
        alert = monitor_pb2.Alert(
            request_id=st.request_id, engine_request_id=st.engine_request_id, model=st.model, layer=layer,
            detector=detector, severity=severity, value=float(value), threshold=float(threshold), message=message,
            token_count=token_count, time=time.time(),
        )
        if len(st.alerts) < MAX_ALERTS_PER_REQUEST:
            st.alerts.append(alert)
            if self.charge is not None and hasattr(st, "bytes"):  # request states (not drift's per-layer states)
                self.charge(st, ALERT_BYTES)
        key = (st.model, detector, severity)
        counter = self._counters.get(key)
        if counter is None:  # .labels() costs a lock and a lookup: once per (model, detector, severity)
            counter = self.metrics.alerts.labels(st.model, detector, severity_name(severity))
            if len(self._counters) < 4096:  # models are capped (--max-models); this is a backstop
                self._counters[key] = counter
        counter.inc()
        for w in self.watchers.values():  # nothing here awaits: the dict cannot change meanwhile
            if w.model and w.model != alert.model:
                continue
            if w.detector and w.detector != alert.detector:
                continue
            if alert.severity < w.min_severity:
                continue
            queue = w.queue
            if queue.full():  # a slow watcher loses its oldest alert, never blocks ingest
                queue.get_nowait()
                w.dropped += 1
                self.metrics.alerts_dropped.inc()
            queue.put_nowait(alert)
        return alert

    @staticmethod
    def check_filter(request: monitor_pb2.WatchAlertsRequest) -> str | None:
        """The problem with a WatchAlerts filter, None when it is fine."""
        if request.min_severity not in monitor_pb2.Severity.values():
            return f"min_severity: {request.min_severity} is not one of {sorted(monitor_pb2.Severity.values())}"
        return None

    async def serve(self, request: monitor_pb2.WatchAlertsRequest, context, batched: bool = False) -> None:
        """Write the alerts matching `request` to a WatchAlerts stream as they are raised, until
        the client goes. A write the client does not take within stall_s (its HTTP/2 window is
        full: it stopped reading) ends the stream with RESOURCE_EXHAUSTED; meanwhile its queue
        keeps the newest alerts. Over max_watchers, the stream is refused at once. `batched`
        (WatchAlertBatches): each write is an AlertBatch of everything queued, up to
        BATCH_ALERTS — a write costs the sidecar 30–40 µs of CPU whatever it carries, so a
        storm of alerts reaches a batched watcher in a few writes instead of one per alert."""
        if len(self.watchers) >= self.max_watchers:
            self.metrics.refused.labels("watchers").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"WatchAlerts: {self.max_watchers} watchers already connected (the sidecar's "
                                "--max-watchers); close one or raise the limit")
        w = _Watcher(request, self.queue_size)
        key = id(w)
        self.watchers[key] = w
        self.metrics.alert_watchers.inc()
        loop = asyncio.get_running_loop()
        queue = w.queue
        try:
            while True:
                alert = await queue.get()
                # One deadline per burst, pushed back after every write the client took: an
                # asyncio.timeout costs a timer handle, where wait_for per write cost a task
                # (the fan-out of one alert to every watcher is the sidecar's costliest path).
                try:
                    async with asyncio.timeout(self.stall_s) as deadline:
                        if batched:
                            while alert is not None:
                                out = [alert]
                                while len(out) < BATCH_ALERTS and not queue.empty():
                                    out.append(queue.get_nowait())
                                await context.write(monitor_pb2.AlertBatch(alerts=out, dropped=w.dropped))
                                alert = queue.get_nowait() if not queue.empty() else None
                                deadline.reschedule(loop.time() + self.stall_s)
                            continue
                        await context.write(alert)
                        while not queue.empty():  # what was raised meanwhile, without a wake-up each
                            deadline.reschedule(loop.time() + self.stall_s)
                            await context.write(queue.get_nowait())
                except TimeoutError:
                    self.metrics.refused.labels("watcher_stalled").inc()
                    break
        finally:
            self.watchers.pop(key, None)
            self.metrics.alert_watchers.dec()
        # outside the finally: an abort is an exception, and the watcher is gone already
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"WatchAlerts: the client took no alert for {self.stall_s:g} s (the sidecar's "
                            f"--watcher-stall-s) and was disconnected after {w.dropped} dropped alert(s); read "
                            "the stream continuously, or narrow it with model/detector/min_severity")
