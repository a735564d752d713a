"""The sidecar's gRPC server (grpc.aio): Ingest, WatchAlerts, GetReport,
plus the standard health service and server reflection, and /metrics over HTTP.

All request state lives on the server's event loop (no locks); Prometheus
scrapes run on their own thread and read only thread-safe metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

from .detectors import SEVERITY_NAMES, SpikeDetector, dump_calibration
from .live_risk import DETECTOR as RISK_DETECTOR
from .live_risk import WARNING as RISK_SEVERITY
from .live_risk import LiveRisk, LiveRiskSetup
from .metrics import Metrics
from .state import MAX_ALERTS_PER_REQUEST, REPORT_HISTORY, History, LayerState, RequestStore

log = logging.getLogger("eigenwatch.sidecar")

SERVICE_NAME = monitor_pb2.DESCRIPTOR.services_by_name["Monitor"].full_name
REQUIRED_DESCRIPTORS = ("sigma2", "trace_mean", "spectral_entropy", "lambda1")
MAX_MESSAGE_BYTES = 16 << 20
_SEVERITY_LABEL = {v: k for k, v in monitor_pb2.Severity.items()}


@dataclass
class SidecarConfig:
    listen: str = "127.0.0.1:50151"
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9400  # 0: any free port; None: no /metrics endpoint
    calibration_frames: int = 64
    quantile: float = 0.99
    spike_threshold: int | None = None
    persist: int = 2  # consecutive windows over threshold before an alert
    max_requests: int = 10_000
    idle_timeout_s: float = 900.0
    save_calibration: str | None = None
    token: str | None = None  # require `authorization: Bearer <token>` on the Monitor service
    report_history: int = REPORT_HISTORY  # frames per layer (and risk steps) a report keeps


def validate_frame(f: monitor_pb2.Frame, n_names: int, eigs: np.ndarray | None = None,
                   desc: np.ndarray | None = None) -> tuple[str, str] | None:
    """(field, problem) for a malformed frame, None when it is fine. `eigs` and
    `desc` are the frame's values as float64 arrays, when the caller has them."""
    if not f.request_id:
        return "request_id", "must not be empty"
    if not f.engine_request_id:
        return "engine_request_id", "must not be empty"
    if not f.model:
        return "model", "must not be empty"
    if f.layer < 0:
        return "layer", f"must be >= 0, got {f.layer}"
    if f.window < 2:
        return "window", f"must be >= 2 (a single row has no spectrum), got {f.window}"
    if f.dim < 1:
        return "dim", f"must be >= 1, got {f.dim}"
    if f.token_count < 0 or f.skipped_tokens < 0:
        return "token_count", "token_count and skipped_tokens must be >= 0"
    if len(f.eigenvalues) != f.window:
        return "eigenvalues", f"has {len(f.eigenvalues)} values but window is {f.window}"
    if len(f.descriptors) != n_names:
        return "descriptors", f"has {len(f.descriptors)} values but descriptor_names has {n_names}"
    eigs = np.asarray(f.eigenvalues, dtype=np.float64) if eigs is None else eigs
    desc = np.asarray(f.descriptors, dtype=np.float64) if desc is None else desc
    if not np.isfinite(eigs).all():
        return "eigenvalues", "contains NaN or Inf"
    if not np.isfinite(desc).all():
        return "descriptors", "contains NaN or Inf"
    return None


@dataclass
class _LayerMetrics:
    ingested: object
    entropy: object
    lambda1: object
    spikes: object


class MonitorService(monitor_pb2_grpc.MonitorServicer):
    def __init__(self, cfg: SidecarConfig, detector: SpikeDetector, metrics: Metrics,
                 risk: LiveRiskSetup | None = None):
        self.cfg = cfg
        self.detector = detector
        self.metrics = metrics
        self.store = RequestStore(cfg.max_requests, cfg.idle_timeout_s)
        self.store.on_evict = self._evicted
        self.risk = None if risk is None else LiveRisk(risk, metrics, history=cfg.report_history,
                                                       on_alert=self._risk_alert)
        if self.risk is not None:
            self.store.on_finish = self.risk.finish  # requests the idle sweep closes
        # id -> (queue, filter); protobuf messages are unhashable, so no set of tuples.
        self.watchers: dict[int, tuple[asyncio.Queue, monitor_pb2.WatchAlertsRequest]] = {}
        self.detector.on_calibrated = self._calibrated
        self._children: dict[tuple[str, int], _LayerMetrics] = {}
        for (model, layer), cal in detector.calibration.items():
            metrics.calibration_sigma2.labels(model, str(layer)).set(cal.sigma2)

    # ---- Ingest ----------------------------------------------------------------------
    async def Ingest(self, request_iterator, context):
        accepted = rejected = 0
        self.metrics.ingest_streams.inc()
        try:
            index = -1
            async for batch in request_iterator:
                index += 1
                if batch.HasField("stats"):
                    self.metrics.taps.update(batch.stats)
                if not batch.frames:
                    continue
                names = list(batch.descriptor_names)
                missing = [n for n in REQUIRED_DESCRIPTORS if n not in names]
                if missing:
                    rejected += len(batch.frames)
                    self.metrics.frames_rejected.labels("descriptor_names").inc(len(batch.frames))
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"batch {index}: descriptor_names: missing {', '.join(missing)} "
                        f"(got {names or 'none'})",
                    )
                first_error = None
                index_of = {n: i for i, n in enumerate(names)}
                names_t = tuple(names)
                risk = self.risk
                risk_idx = risk.batch_index(names_t) if risk is not None else None
                finished = []
                for j, frame in enumerate(batch.frames):
                    eigs = np.asarray(frame.eigenvalues, dtype=np.float64)
                    desc = np.asarray(frame.descriptors, dtype=np.float64)
                    problem = validate_frame(frame, len(names), eigs, desc)
                    if problem is not None:
                        rejected += 1
                        self.metrics.frames_rejected.labels(problem[0]).inc()
                        first_error = first_error or f"batch {index}: frames[{j}].{problem[0]}: {problem[1]}"
                        continue
                    st, done = self._apply(frame, index_of, names_t, eigs, desc)
                    if risk is not None:
                        risk.add(st, frame, desc, risk_idx)
                        if done:
                            finished.append(st)
                    accepted += 1
                if risk is not None:
                    # All steps this batch completed, in one model call (per round), then
                    # the requests it finished let go of their model state.
                    risk.flush()
                    for st in finished:
                        risk.finish(st)
                if first_error is not None:
                    # The valid frames of the batch were kept; the stream ends so the
                    # sender sees the error (a tap reconnects and goes on).
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, first_error)
        finally:
            self.metrics.ingest_streams.dec()
        return monitor_pb2.IngestSummary(frames_accepted=accepted, frames_rejected=rejected)

    def _apply(self, f: monitor_pb2.Frame, index_of: dict[str, int], names: tuple[str, ...], eigs: np.ndarray,
               desc: np.ndarray):
        """Frame -> request state, metrics, spike detector. Returns (state, whether this frame finished it)."""
        st, new = self.store.get_or_create(f.engine_request_id, f.request_id, f.model, f.skipped_tokens)
        if new:
            self.metrics.requests.labels(f.model).inc()
            st.descriptor_names = names
        m = self._layer_metrics(f.model, f.layer)
        m.ingested.inc()
        m.entropy.observe(float(desc[index_of["spectral_entropy"]]))
        m.lambda1.observe(float(desc[index_of["lambda1"]]))

        ls = st.layers.get(f.layer)
        if ls is None:
            width = len(st.descriptor_names)
            ls = st.layers[f.layer] = LayerState(history=History(self.cfg.report_history, width))
        ls.frames += 1
        ls.token_count = max(ls.token_count, f.token_count)
        ls.window, ls.dim = f.window, f.dim
        ls.last_descriptors = desc
        ls.last_eigenvalues = eigs.astype(np.float32)
        if names == st.descriptor_names:  # a tap that changed descriptor versions mid-request: keep the first
            ls.history.append(f.token_count, desc)

        res = self.detector.observe(f.model, f.layer, eigs, f.window, f.dim,
                                    float(desc[index_of["sigma2"]]), float(desc[index_of["trace_mean"]]))
        if res.spikes is not None:
            m.spikes.observe(res.spikes)
            ls.max_spikes = max(ls.max_spikes, res.spikes)
            ls.over_streak = ls.over_streak + 1 if res.severity else 0
            key = (self.detector.name, f.layer)
            # Alert only when the excess persists for `persist` consecutive windows
            # (one odd window is not a finding), once per severity level.
            if res.severity and ls.over_streak >= self.cfg.persist and res.severity > st.fired.get(key, 0):
                st.fired[key] = res.severity
                self._raise(st, self.detector.name, res.severity, res.spikes, res.threshold,
                            f"{res.spikes} eigenvalues above the calibrated MP edge at layer {f.layer} "
                            f"(threshold {int(res.threshold)})", f.layer, f.token_count)
        done = f.final and not st.finished
        if new or done:
            st.finished = st.finished or f.final
            self._refresh_active()  # O(requests), so only when the set of active ones changes
        return st, done

    def _risk_alert(self, st, risk: float, token_count: int) -> None:
        # layer -1: the risk reads several layers (listed in Report.risk.layers).
        self._raise(st, RISK_DETECTOR, RISK_SEVERITY, risk, self.risk.th.high, self.risk.alert_message(risk),
                    -1, token_count)

    def _evicted(self, st, reason: str) -> None:
        self.metrics.requests_evicted.labels(reason).inc()
        if self.risk is not None:
            self.risk.finish(st)

    def _layer_metrics(self, model: str, layer: int) -> "_LayerMetrics":
        # prometheus-client's .labels() costs a lock and a dict lookup per call:
        # resolve each (model, layer) child once.
        key = (model, layer)
        lm = self._children.get(key)
        if lm is None:
            label = str(layer)
            m = self.metrics
            lm = self._children[key] = _LayerMetrics(
                m.frames_ingested.labels(model, label), m.spectral_entropy.labels(model, label),
                m.lambda1.labels(model, label), m.spikes.labels(model, label),
            )
        return lm

    def _refresh_active(self) -> None:
        active = self.store.active_by_model()
        for model, n in active.items():
            self.metrics.active_requests.labels(model).set(n)
        for model in getattr(self, "_active_models", set()) - set(active):
            self.metrics.active_requests.labels(model).set(0)
        self._active_models = set(active)

    def _raise(self, st, detector: str, severity: int, value: float, threshold: float, message: str,
               layer: int, token_count: int) -> None:
        alert = monitor_pb2.Alert(
            request_id=st.request_id,
            engine_request_id=st.engine_request_id,
            model=st.model,
            layer=layer,
            detector=detector,
            severity=severity,
            value=float(value),
            threshold=float(threshold),
            message=message,
            token_count=token_count,
            time=time.time(),
        )
        if len(st.alerts) < MAX_ALERTS_PER_REQUEST:
            st.alerts.append(alert)
        self.metrics.alerts.labels(st.model, detector, SEVERITY_NAMES.get(severity, str(severity))).inc()
        for queue, flt in list(self.watchers.values()):
            if flt.model and flt.model != alert.model:
                continue
            if flt.detector and flt.detector != alert.detector:
                continue
            if alert.severity < flt.min_severity:
                continue
            if queue.full():  # a slow watcher loses its oldest alert, never blocks ingest
                queue.get_nowait()
                self.metrics.alerts_dropped.inc()
            queue.put_nowait(alert)

    def _calibrated(self, key, cal) -> None:
        model, layer = key
        self.metrics.calibration_sigma2.labels(model, str(layer)).set(cal.sigma2)
        log.info("calibrated %s layer %d: sigma2=%.4g spike_threshold=%d (%d frames)",
                 model, layer, cal.sigma2, cal.spike_threshold, cal.frames)
        if self.cfg.save_calibration:
            import json
            from pathlib import Path

            Path(self.cfg.save_calibration).write_text(json.dumps(dump_calibration(self.detector.calibration), indent=2))

    # ---- WatchAlerts -----------------------------------------------------------------
    async def WatchAlerts(self, request, context):
        if request.min_severity not in _SEVERITY_LABEL:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"min_severity: {request.min_severity} is not one of {sorted(_SEVERITY_LABEL)}",
            )
        queue: asyncio.Queue = asyncio.Queue(maxsize=1024)
        key = id(queue)
        self.watchers[key] = (queue, request)
        self.metrics.alert_watchers.inc()
        try:
            while True:
                yield await queue.get()
        finally:
            self.watchers.pop(key, None)
            self.metrics.alert_watchers.dec()

    # ---- GetReport -------------------------------------------------------------------
    async def GetReport(self, request, context):
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        st = self.store.get(request.request_id)
        if st is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"request_id: no monitored request {request.request_id!r} (never seen, opted out, or evicted)",
            )
        from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES

        rep = monitor_pb2.Report(
            request_id=st.request_id,
            engine_request_id=st.engine_request_id,
            model=st.model,
            finished=st.finished,
            skipped_tokens=st.skipped_tokens,
            # The order the request's frames carried their descriptors in (a tap of
            # another descriptor version sends other names).
            descriptor_names=st.descriptor_names or DESCRIPTOR_NAMES,
            alerts=st.alerts,
        )
        for layer, ls in sorted(st.layers.items()):
            lr = monitor_pb2.LayerReport(
                layer=layer, frames=ls.frames, token_count=ls.token_count, window=ls.window, dim=ls.dim,
                last_descriptors=[] if ls.last_descriptors is None else ls.last_descriptors.tolist(),
                last_eigenvalues=[] if ls.last_eigenvalues is None else ls.last_eigenvalues.tolist(),
                max_spikes=ls.max_spikes,
            )
            if ls.history is not None:
                counts, values = ls.history.items()
                lr.history.extend(monitor_pb2.DescriptorSample(token_count=int(c), descriptors=v.tolist())
                                  for c, v in zip(counts, values))
            rep.layers.append(lr)
        if self.risk is not None and st.risk is not None:
            rep.risk.CopyFrom(self.risk.report(st.risk))
        return rep

    async def sweep_forever(self, every_s: float = 30.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            if self.store.sweep():
                self._refresh_active()


class TokenAuth(grpc.aio.ServerInterceptor):
    """Bearer-token check on the Monitor service (`authorization: Bearer <token>`
    metadata). Health and reflection stay open for probes and tooling."""

    def __init__(self, token: str):
        import hmac

        self._expected = f"Bearer {token}".encode()
        self._compare = hmac.compare_digest

    def _allowed(self, details) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                value = value.encode() if isinstance(value, str) else value
                return self._compare(value, self._expected)
        return False

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/") or self._allowed(details):
            return handler
        message = "authorization: missing or wrong bearer token (set EIGENWATCH_TOKEN for taps and clients)"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover  (makes this an async generator)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)


class Sidecar:
    """A running sidecar: gRPC server + /metrics. Use `await start()`, `await stop()`."""

    def __init__(self, cfg: SidecarConfig, detector: SpikeDetector | None = None,
                 registry: CollectorRegistry | None = None, risk: LiveRiskSetup | None = None):
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.detector = detector or SpikeDetector(
            calibration_frames=cfg.calibration_frames, quantile=cfg.quantile, spike_threshold=cfg.spike_threshold
        )
        self.service = MonitorService(cfg, self.detector, self.metrics, risk)
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._http = None
        self._sweeper = None

    async def start(self) -> None:
        self.server = grpc.aio.server(
            interceptors=[TokenAuth(self.cfg.token)] if self.cfg.token else None,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        monitor_pb2_grpc.add_MonitorServicer_to_server(self.service, self.server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        try:
            self.port = self.server.add_insecure_port(self.cfg.listen)
        except RuntimeError:
            self.port = 0
        if self.port == 0 and not self.cfg.listen.startswith("unix:"):
            await self.server.stop(None)
            raise OSError(f"--listen: could not bind {self.cfg.listen!r} (address in use, or not host:port / unix:///path)")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.cfg.metrics_port is not None and self.cfg.metrics_port >= 0:
            try:
                self._http, _thread = start_http_server(self.cfg.metrics_port, addr=self.cfg.metrics_host,
                                                        registry=self.registry)
            except OSError as exc:
                await self.server.stop(None)
                raise OSError(f"--metrics-port: could not listen on {self.cfg.metrics_host}:{self.cfg.metrics_port} "
                              f"({exc.strerror or exc}); pick a free port, 0 for any, or -1 for none") from None
            self.metrics_port = self._http.server_port
        self._sweeper = asyncio.get_running_loop().create_task(self.service.sweep_forever())

    async def stop(self, grace: float = 1.0) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            await self.server.stop(grace)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
