"""The sidecar's gRPC server (grpc.aio): Ingest, WatchAlerts, GetReport, the
Shield service (shield_service.py), the standard health service and server
reflection, and /metrics over HTTP.

All request state lives on the server's event loop (no locks); Prometheus
scrapes run on their own thread and read only thread-safe metrics. Work that
could block the loop (writing the learned calibration) runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from eigenwatch.hooks import frames as wire
from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES, INDEX, describe_windows
from eigenwatch.kernels.gram import spectra_np
from eigenwatch.monitor import calibration as calib
from eigenwatch.monitor.spectral_spike import DimMismatch, SpikeDetector
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc, shield_pb2_grpc

from .alerts import AlertHub, Persistence
from .config import SidecarConfig
from .drift import DriftMonitor, validate_snapshot
from .metrics import Metrics
from .risk import DETECTOR as RISK_DETECTOR
from .risk import WARNING as RISK_SEVERITY
from .risk import LiveRisk, LiveRiskSetup
from .shield_service import SERVICE_NAME as SHIELD_SERVICE_NAME
from .shield_service import Loaded as LoadedShield
from .shield_service import ShieldLoadError, ShieldService, keep_freed_memory, limit_blas_threads, load_shield
from .state import History, LayerState, RequestStore

log = logging.getLogger("eigenwatch.sidecar")

SERVICE_NAME = monitor_pb2.DESCRIPTOR.services_by_name["Monitor"].full_name
REQUIRED_DESCRIPTORS = ("sigma2", "trace_mean", "spectral_entropy", "lambda1")
# The largest window a frame may send as a centred Gram (the tap's own limit):
# its eigensolve runs here, O(W³).
MAX_GRAM_WINDOW = 1024


def gram_spectra(frames) -> dict[int, tuple[np.ndarray, np.ndarray] | str]:
    """Eigenvalues and descriptors of the frames that carry a centred Gram:
    {index: (eigs [W] float64, descriptors [D] float64) or why the window gives
    none}. One batched eigensolve and descriptor call per window size
    (kernels/gram.py, kernels/descriptors.py: the functions the tap's
    `to_frames` uses). Frames must be valid (validate_frame) already."""
    by_window: dict[int, list[int]] = {}
    for j, f in frames:
        by_window.setdefault(f.window, []).append(j)
    index = dict(frames)
    out: dict[int, tuple[np.ndarray, np.ndarray] | str] = {}
    for w, idx in by_window.items():
        grams = np.frombuffer(b"".join(index[j].centred_gram for j in idx), dtype="<f4").reshape(len(idx), w, w)
        eigs, row_sq, ok = spectra_np(grams, w, 1.0, centred=True)
        desc, why = describe_windows(eigs, row_sq, ok, np.full(len(idx), w), [index[j].dim for j in idx])
        for i, j in enumerate(idx):
            out[j] = why[i] if why[i] is not None else (eigs[i], desc[i])
    return out


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
    if f.centred_gram:
        if f.eigenvalues or f.descriptors:
            return "centred_gram", "set either centred_gram or eigenvalues and descriptors, not both"
        if f.window > MAX_GRAM_WINDOW:
            return "window", f"a centred_gram frame takes at most {MAX_GRAM_WINDOW} rows, got {f.window}"
        if len(f.centred_gram) != 4 * f.window * f.window:
            return "centred_gram", (f"has {len(f.centred_gram)} bytes but window {f.window} needs "
                                    f"{4 * f.window * f.window} (float32 [window × window])")
        return None
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


def _unusable_reason(why: str) -> str:
    return "nonfinite" if "NaN" in why or "non-finite" in why else "degenerate"


@dataclass
class _LayerMetrics:
    ingested: object
    entropy: object
    lambda1: object
    spikes: object


class MonitorService(monitor_pb2_grpc.MonitorServicer):
    def __init__(self, cfg: SidecarConfig, detector: SpikeDetector, metrics: Metrics,
                 risk: LiveRiskSetup | None = None, frame_sink=None):
        self.cfg = cfg
        self.detector = detector
        self.metrics = metrics
        self.alerts = AlertHub(metrics)
        self.persistence = Persistence(cfg.persist)
        self.store = RequestStore(cfg.max_requests, cfg.idle_timeout_s)
        self.store.on_evict = self._evicted
        self.risk = None if risk is None else LiveRisk(risk, metrics, history=cfg.report_history,
                                                       on_alert=self._risk_alert)
        if self.risk is not None:
            self.store.on_finish = self.risk.finish  # requests the idle sweep closes
        # run() has checked the file already; in-process sidecars (tests, offline) load it here
        self.drift = DriftMonitor(calib.load(cfg.calibration).drift if cfg.calibration else None, metrics,
                                  self.alerts)
        # Every accepted frame, as a hooks.frames.Frame, to a callback on the loop
        # (the offline `--engine vllm` path collects a text's frames this way).
        self.frame_sink = frame_sink
        self.detector.on_calibrated = self._calibrated
        self._children: dict[tuple[str, int], _LayerMetrics] = {}
        self._active_models: set[str] = set()
        self._writer = _CalibrationWriter(cfg.save_calibration) if cfg.save_calibration else None
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
                snap_error = self._snapshots(batch.directions) if batch.directions else None
                if not batch.frames:
                    if snap_error is not None:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {index}: {snap_error}")
                    continue
                names = list(batch.descriptor_names)
                grams = [(j, f) for j, f in enumerate(batch.frames) if f.centred_gram]
                missing = [n for n in REQUIRED_DESCRIPTORS if n not in names]
                if missing and len(grams) < len(batch.frames):
                    rejected += len(batch.frames)
                    self.metrics.frames_rejected.labels("descriptor_names").inc(len(batch.frames))
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"batch {index}: descriptor_names: missing {', '.join(missing)} "
                        f"(got {names or 'none'})",
                    )
                first_error = None
                mismatch = None
                problems = {j: validate_frame(f, len(names)) for j, f in grams}
                computed = {}
                if grams:
                    # Off the event loop: other streams and RPCs go on while LAPACK runs.
                    computed = await asyncio.get_running_loop().run_in_executor(
                        None, gram_spectra, [(j, f) for j, f in grams if problems[j] is None])
                # Spectrum frames use the batch's descriptor names; Gram frames this
                # sidecar's (it computed their descriptors).
                index_of = {n: i for i, n in enumerate(names)}
                names_t = tuple(names)
                risk = self.risk
                kinds = {False: (index_of, names_t, risk.batch_index(names_t) if risk is not None else None),
                         True: (INDEX, DESCRIPTOR_NAMES,
                                risk.batch_index(DESCRIPTOR_NAMES) if risk is not None and grams else None)}
                finished = []
                sink = [] if self.frame_sink is not None else None
                for j, frame in enumerate(batch.frames):
                    has_gram = bool(frame.centred_gram)
                    if has_gram:
                        problem = problems[j]
                        got = computed.get(j)
                        if problem is None and isinstance(got, str):
                            # NaN activations, a degenerate window: nothing malformed, counted
                            self.metrics.windows_unusable.labels(frame.model, _unusable_reason(got)).inc()
                            continue
                        eigs, desc = got if problem is None else (None, None)
                    else:
                        eigs = np.asarray(frame.eigenvalues, dtype=np.float64)
                        desc = np.asarray(frame.descriptors, dtype=np.float64)
                        problem = validate_frame(frame, len(names), eigs, desc)
                    if problem is not None:
                        rejected += 1
                        self.metrics.frames_rejected.labels(problem[0]).inc()
                        first_error = first_error or f"batch {index}: frames[{j}].{problem[0]}: {problem[1]}"
                        continue
                    f_index, f_names, f_risk = kinds[has_gram]
                    try:
                        st, done = self._apply(frame, f_index, f_names, eigs, desc)
                    except DimMismatch as exc:  # calibrated for other tap settings: refuse, loudly
                        rejected += 1
                        self.metrics.frames_rejected.labels("dim").inc()
                        mismatch = mismatch or f"batch {index}: frames[{j}].{exc}"
                        continue
                    if risk is not None:
                        risk.add(st, frame, desc, f_risk)
                        if done:
                            finished.append(st)
                    if sink is not None:
                        sink.append(wire.from_proto(frame, f_names, eigs, desc))
                    accepted += 1
                if risk is not None:
                    # All steps this batch completed, in one model call (per round), then
                    # the requests it finished let go of their model state.
                    risk.flush()
                    for st in finished:
                        risk.finish(st)
                if sink:
                    self.frame_sink(sink)
                if snap_error is not None:
                    first_error = first_error or f"batch {index}: {snap_error}"
                if first_error is not None:
                    # The valid frames of the batch were kept; the stream ends so the
                    # sender sees the error (a tap reconnects and goes on).
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, first_error)
                if mismatch is not None:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, mismatch)
        finally:
            self.metrics.ingest_streams.dec()
        return monitor_pb2.IngestSummary(frames_accepted=accepted, frames_rejected=rejected)

    def _snapshots(self, snaps) -> str | None:
        """Direction snapshots -> the drift detector; the first malformed one's problem (valid ones are kept)."""
        first = None
        for j, s in enumerate(snaps):
            problem = validate_snapshot(s)
            if problem is not None:
                self.metrics.direction_snapshots_rejected.labels(problem[0]).inc()
                first = first or f"directions[{j}].{problem[0]}: {problem[1]}"
                continue
            self.drift.observe(s)
        return first

    def _apply(self, f: monitor_pb2.Frame, index_of: dict[str, int], names: tuple[str, ...], eigs: np.ndarray,
               desc: np.ndarray):
        """Frame -> spike detector, request state, metrics. Returns (state, whether this
        frame finished it). Raises DimMismatch (nothing recorded) for a frame whose
        width the layer's calibration does not match."""
        res = self.detector.observe(f.model, f.layer, eigs, f.window, f.dim,
                                    float(desc[index_of["sigma2"]]), float(desc[index_of["trace_mean"]]))
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

        if res.spikes is not None:
            m.spikes.observe(res.spikes)
            ls.max_spikes = max(ls.max_spikes, res.spikes)
            if self.persistence.step(ls, st.fired, (self.detector.name, f.layer), res.severity):
                self.alerts.raise_alert(st, self.detector.name, res.severity, res.spikes, res.threshold,
                                        f"{res.spikes} eigenvalues above the calibrated MP edge at layer {f.layer} "
                                        f"(threshold {int(res.threshold)})", f.layer, f.token_count)
        done = f.final and not st.finished
        if new or done:
            st.finished = st.finished or f.final
            self._refresh_active()  # O(requests), so only when the set of active ones changes
        return st, done

    def _risk_alert(self, st, risk: float, token_count: int) -> None:
        # layer -1: the risk reads several layers (listed in Report.risk.layers).
        self.alerts.raise_alert(st, RISK_DETECTOR, RISK_SEVERITY, risk, self.risk.th.high,
                                self.risk.alert_message(risk), -1, token_count)

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
        for model in self._active_models - set(active):
            self.metrics.active_requests.labels(model).set(0)
        self._active_models = set(active)

    def _calibrated(self, key, cal) -> None:
        model, layer = key
        self.metrics.calibration_sigma2.labels(model, str(layer)).set(cal.sigma2)
        log.info("calibrated %s layer %d: sigma2=%.4g spike_threshold=%d (%d frames, dim %d)",
                 model, layer, cal.sigma2, cal.spike_threshold, cal.frames, cal.dim)
        if self._writer is not None:
            self._writer.submit(calib.document(dict(self.detector.calibration)))

    # ---- WatchAlerts -----------------------------------------------------------------
    async def WatchAlerts(self, request, context):
        problem = AlertHub.check_filter(request)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        async for alert in self.alerts.watch(request):
            yield alert

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

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._writer.close)


class _CalibrationWriter:
    """Writes the learned calibration off the event loop, one write at a time,
    atomically (monitor/calibration.py): a burst of layers finishing their
    calibration costs one or two writes, always of the newest document."""

    def __init__(self, path: str):
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eigenwatch-calibration")
        self._lock = threading.Lock()
        self._pending: dict | None = None
        self._scheduled = False

    def submit(self, doc: dict) -> None:
        with self._lock:
            self._pending = doc
            if self._scheduled:
                return  # the running write picks the newest document up when it is done
            self._scheduled = True
        self._pool.submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                doc, self._pending = self._pending, None
                if doc is None:
                    self._scheduled = False
                    return
            try:
                calib.save(self.path, doc)
            except OSError as exc:
                log.error("--save-calibration: cannot write %s: %s", self.path, exc.strerror or exc)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Bearer-token check on the Monitor and Shield services (`authorization:
    Bearer <token>` metadata). Health and reflection stay open for probes and tooling."""

    def __init__(self, token: str, services: tuple[str, ...] = (SERVICE_NAME, SHIELD_SERVICE_NAME)):
        import hmac

        self._expected = f"Bearer {token}".encode()
        self._compare = hmac.compare_digest
        self._guarded = tuple(f"/{s}/" for s in services)  # method paths are /package.Service/Method

    def _allowed(self, details) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                value = value.encode() if isinstance(value, str) else value
                return self._compare(value, self._expected)
        return False

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._guarded) or self._allowed(details):
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
                 registry: CollectorRegistry | None = None, risk: LiveRiskSetup | None = None, frame_sink=None,
                 shield: LoadedShield | None = None):
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.detector = detector or SpikeDetector(
            calibration_frames=cfg.calibration_frames, quantile=cfg.quantile, spike_threshold=cfg.spike_threshold
        )
        self.service = MonitorService(cfg, self.detector, self.metrics, risk, frame_sink)
        # shield: cfg.shield loaded already (run() checks it before serving); else loaded here
        self.shield_service = ShieldService(cfg, self.metrics, shield)
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._http = None
        self._sweeper = None
        self._shield_watcher = None

    @property
    def address(self) -> str:
        """Where the gRPC server listens (the bound port when --listen asked for port 0)."""
        if self.cfg.listen.startswith("unix:"):
            return self.cfg.listen
        return f"{self.cfg.listen.rsplit(':', 1)[0]}:{self.port}"

    async def start(self) -> None:
        self.server = grpc.aio.server(
            interceptors=[TokenAuth(self.cfg.token)] if self.cfg.token else None,
            options=[
                ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
            ]
        )
        monitor_pb2_grpc.add_MonitorServicer_to_server(self.service, self.server)
        shield_pb2_grpc.add_ShieldServicer_to_server(self.shield_service, self.server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, SHIELD_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
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
        # Shield is NOT_SERVING without --shield (its calls answer FAILED_PRECONDITION)
        await health_servicer.set(SHIELD_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING
                                  if self.shield_service.loaded else health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.cfg.metrics_enabled:
            try:
                self._http, _thread = start_http_server(self.cfg.metrics_port, addr=self.cfg.metrics_host,
                                                        registry=self.registry)
            except OSError as exc:
                await self.server.stop(None)
                raise OSError(f"--metrics-port: could not listen on {self.cfg.metrics_host}:{self.cfg.metrics_port} "
                              f"({exc.strerror or exc}); pick a free port, 0 for any, or -1 for none") from None
            self.metrics_port = self._http.server_port
        self._sweeper = asyncio.get_running_loop().create_task(self.service.sweep_forever())
        self._shield_watcher = asyncio.get_running_loop().create_task(self.shield_service.watch_forever())

    async def stop(self, grace: float = 1.0) -> None:
        for task in (self._sweeper, self._shield_watcher):
            if task is not None:
                task.cancel()
        if self.server is not None:
            await self.server.stop(grace)
        await self.service.close()
        await self.shield_service.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


class SidecarThread:
    """A sidecar on its own event loop in a background thread of this process
    (the offline `--engine vllm` collector; tests). `start()` returns once it serves."""

    def __init__(self, sidecar: Sidecar):
        self.sidecar = sidecar
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="eigenwatch-sidecar", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.sidecar.start())
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def start(self, timeout: float = 30.0) -> "SidecarThread":
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"the sidecar did not start within {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, grace: float = 0.5) -> None:
        if self._thread.is_alive() and self._error is None:
            asyncio.run_coroutine_threadsafe(self.sidecar.stop(grace), self.loop).result(timeout=grace + 30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
        self.loop.close()


async def _serve(cfg: SidecarConfig, detector: SpikeDetector, risk: LiveRiskSetup | None,
                 shield: LoadedShield | None = None) -> None:
    sidecar = Sidecar(cfg, detector, risk=risk, shield=shield)
    await sidecar.start()
    metrics = f"http://{cfg.metrics_host}:{sidecar.metrics_port}/metrics" if sidecar.metrics_port else "off"
    # The READY line is read by `eigenwatch serve`, the demo and the tests (cli/processes.py).
    print(f"eigenwatch sidecar READY grpc={sidecar.address} metrics={metrics}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sidecar.stop(grace=1.0)
    print("eigenwatch sidecar stopped", flush=True)


def run(cfg: SidecarConfig) -> int:
    """`eigenwatch sidecar`: serve until SIGINT/SIGTERM. Bad settings (a broken
    calibration or shield file, an unusable risk model, a busy port) exit 2 with a message
    naming the flag, before anything is served."""
    from .risk import LiveRiskError, load_live_risk

    try:
        cal = calib.load(cfg.calibration) if cfg.calibration else None
        detector = SpikeDetector(cal.spike if cal else None, cfg.calibration_frames, cfg.quantile,
                                 cfg.spike_threshold)
        risk = load_live_risk(cfg, cal)  # the ONNX model and its thresholds, checked before serving
        shield = load_shield(cfg) if cfg.shield else None
    except (calib.CalibrationError, LiveRiskError, ShieldLoadError) as exc:
        print(f"eigenwatch sidecar: {exc}", file=sys.stderr)
        return 2
    if cal is not None and cal.tap:
        log.info("calibration %s was made with tap settings %s; frames of another width are refused",
                 cfg.calibration, cal.tap)
    if cfg.nice:
        import os

        os.nice(cfg.nice)  # on shared cores the server comes first (bench/bench_overhead.py measures it)
    if cfg.blas_threads:
        why = limit_blas_threads(cfg.blas_threads)
        if why:
            log.warning("--blas-threads %d: %s", cfg.blas_threads, why)
    why = keep_freed_memory()  # Filter's big short-lived buffers: no page faults per call
    if why:
        log.info("large buffers: %s", why)
    try:
        asyncio.run(_serve(cfg, detector, risk, shield))
    except OSError as exc:
        print(f"eigenwatch sidecar: {exc}", file=sys.stderr)
        return 2
    return 0
