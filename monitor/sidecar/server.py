"""The sidecar's gRPC server (grpc.aio): Ingest, WatchAlerts, GetReport, the
Shield service (shield_service.py), the standard health service and server
reflection, and /metrics over HTTP.

All request state lives on the server's event loop (no locks); Prometheus
scrapes run on their own thread and read only thread-safe metrics. Work that
could block the loop (writing the learned calibration, Gram eigensolves,
building a large report) runs on worker threads.

Bounds (README "Limits"): every message is decoded inside its handler, so bytes
that are not the method's message get INVALID_ARGUMENT (logged once a minute
per client, never a traceback); every frame is checked against fixed limits
(ids, labels, window, dim, descriptor names) before anything of it is stored;
label values are admitted up to --max-models / --max-layers; request state is
bounded by --max-requests and by --memory-budget-mb; --max-streams and
--max-watchers bound concurrent streams; GetReport refuses a reply over gRPC's
message limit before building it. Client strings in logs and error messages
are escaped and shortened (`clip`).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from eigenwatch.hooks import frames as wire
from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES, INDEX
from eigenwatch.monitor import calibration as calib
from eigenwatch.monitor.spectral_spike import DimMismatch, SpikeDetector, SpikeResult
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc, shield_pb2_grpc, sparse_pb2_grpc

from . import tls
from .alerts import AlertHub, Persistence
from .combined import live_combined
from .config import SidecarConfig
from .drift import DriftMonitor, validate_snapshot
from .metrics import Metrics
from .risk import DETECTOR as RISK_DETECTOR
from .risk import WARNING as RISK_SEVERITY
from .risk import LiveRisk, LiveRiskSetup
from .shield_service import SERVICE_NAME as SHIELD_SERVICE_NAME
from .shield_service import Loaded as LoadedShield
from .shield_service import ENERGY_DETECTOR, ShieldLoadError, ShieldService, keep_freed_memory, limit_blas_threads, load_shield
from .signatures import SignatureFileError, SignatureMatcher
from .sparse_service import SERVICE_NAME as SPARSE_SERVICE_NAME
from .sparse_service import SparseService
from .state import REQUEST_BYTES, History, LabelGuard, LayerState, RequestStore, layer_bytes
from .validate import (MAX_ID_CHARS, MAX_LABEL_CHARS, MAX_LAYER, REQUIRED_DESCRIPTORS, bad_value_rows, check_columns,
                       check_labels, check_names, clip, column_problems, count_spikes, gram_rows, gram_spectra,
                       spectrum_batch, unusable_reason, validate_frame, value_problem)

log = logging.getLogger("eigenwatch.sidecar")

SERVICE_NAME = monitor_pb2.DESCRIPTOR.services_by_name["Monitor"].full_name
# Margin under gRPC's message limit for a report's field tags and lengths.
REPORT_MARGIN = 64 << 10
UNDECODABLE_LOG_EVERY_S = 60.0
RISK_FLUSH_S = 0.005  # a completed step waits at most this long for the risk model's call ...
RISK_FLUSH_REQUESTS = 256  # ... or until this many requests have one waiting



class MonitorService(monitor_pb2_grpc.MonitorServicer):
    def __init__(self, cfg: SidecarConfig, detector: SpikeDetector, metrics: Metrics,
                 risk: LiveRiskSetup | None = None, frame_sink=None):
        self.cfg = cfg
        self.detector = detector
        self.metrics = metrics
        self.store = RequestStore(cfg.max_requests, cfg.idle_timeout_s, budget_bytes=cfg.memory_budget_mb << 20)
        self.store.on_evict = self._evicted
        self.store.on_active = self._set_active
        self.alerts = AlertHub(metrics, max_watchers=cfg.max_watchers, stall_s=cfg.watcher_stall_s,
                               charge=self.store.charge)
        self.persistence = Persistence(cfg.persist)
        self.labels = LabelGuard(cfg.max_models, cfg.max_layers)
        detector.on_refused = self._refused
        metrics.memory_budget.set(cfg.memory_budget_mb << 20)
        metrics.state_bytes.set_function(lambda: self.store.held + self.detector.buffer_bytes)
        self._streams = 0
        self._reports = asyncio.Semaphore(2)  # reports built at once (worker threads; the GIL is shared)
        self._bad_clients: dict[str, float] = {}  # peer -> when its last undecodable message was logged
        self.risk = None if risk is None else LiveRisk(risk, metrics, history=cfg.report_history,
                                                       on_alert=self._risk_alert)
        if self.risk is not None:
            self.store.on_finish = self.risk.finish  # requests the idle sweep closes
        # run() has checked the file already; in-process sidecars (tests, offline) load it here
        self.signatures = SignatureMatcher(cfg, self.alerts)  # --signatures (SignatureFileError)
        self.drift = DriftMonitor(calib.load(cfg.calibration).drift if cfg.calibration else None, metrics,
                                  self.alerts)
        # The calibration's combined score, live (sidecar/combined.py); None without one it can compute.
        self.combined = live_combined(cfg, self.risk, self.alerts, metrics)
        # Every accepted frame, as a hooks.frames.Frame, to a callback on the loop
        # (the offline `--engine vllm` path collects a text's frames this way).
        self.frame_sink = frame_sink
        self.embedding_sink = None  # taps' pooled embeddings -> the Shield service (set by Sidecar)
        self.detector.on_calibrated = self._calibrated
        # (model, layer) -> its row of metrics.WindowMetrics; per-batch gathered values (rows,
        # entropy, lambda1, spike rows, spikes), written by _flush_window_metrics
        self._window_rows: dict[tuple[str, int], int] = {}
        self._window_acc: tuple[list, ...] = ([], [], [], [], [])
        self._finished: list = []  # requests finished since the last _score
        self._score_timer: asyncio.TimerHandle | None = None
        # What --save-calibration holds already: a restart adds to it (run() has checked the file)
        self._saved = calib.load_for_saving(cfg.save_calibration) if cfg.save_calibration else None
        self._writer = _CalibrationWriter(cfg.save_calibration) if cfg.save_calibration else None
        for (model, layer), cal in detector.calibration.items():
            metrics.calibration_sigma2.labels(model, str(layer)).set(cal.sigma2)

    # ---- Ingest ----------------------------------------------------------------------
    def _refused(self, reason: str, n: int = 1) -> None:
        self.metrics.refused.labels(reason).inc(n)

    async def Ingest(self, request_iterator, context):
        if self._streams >= self.cfg.max_streams:
            self._refused("streams")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"Ingest: {self.cfg.max_streams} streams already open (the sidecar's --max-streams); "
                                "send every frame of a tap over one stream, or raise the limit")
        self._streams += 1
        self.metrics.ingest_streams.inc()
        try:
            return await self._ingest(request_iterator, context)
        finally:
            if self.risk is not None or self.combined is not None:
                self._score(now=True)  # what this stream sent is scored when it ends
            self._streams -= 1
            self.metrics.ingest_streams.dec()

    async def _ingest(self, request_iterator, context):
        accepted = rejected = 0
        index = -1
        async for batch in request_iterator:
            index += 1
            if batch.HasField("stats"):
                self._tap_stats(batch.stats)
            snap_error = self._snapshots(batch.directions) if batch.directions else None
            if batch.embeddings and self.embedding_sink is not None:  # Shield.WatchEmbeddings
                bad = self.embedding_sink(batch.embeddings)
                if bad is not None and snap_error is None:
                    snap_error = (grpc.StatusCode.INVALID_ARGUMENT, bad)
            if not batch.frames and not batch.columns:
                if snap_error is not None:
                    await context.abort(snap_error[0], f"batch {index}: {snap_error[1]}")
                continue
            names = list(batch.descriptor_names)
            problem = check_names(names)
            n_frames = len(batch.frames) + sum(len(c.layer) for c in batch.columns)
            if problem is not None:
                rejected += n_frames
                self.metrics.frames_rejected.labels("descriptor_names").inc(n_frames)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {index}: {problem}")
            # Limits and label admission first: nothing of a refused frame is computed or kept.
            guard = self.labels
            refused: dict[int, tuple[str, str]] = {}
            over: str | None = None
            for j, f in enumerate(batch.frames):
                if len(f.request_id) > MAX_ID_CHARS or len(f.engine_request_id) > MAX_ID_CHARS or \
                        (f.model, f.layer) not in guard.pairs:
                    problem = check_labels(f)
                    if problem is None and f.model and f.layer >= 0:
                        why = guard.admit(f.model, f.layer)
                        if why is not None:
                            self._refused(why)
                            refused[j] = ("", why)
                            over = over or why
                            continue
                    if problem is not None:
                        refused[j] = problem
            grams = [(j, f) for j, f in enumerate(batch.frames) if f.centred_gram and j not in refused]
            missing = [n for n in REQUIRED_DESCRIPTORS if n not in names]
            if missing and not (all(f.centred_gram for f in batch.frames) and all(c.centred_grams for c in batch.columns)):
                rejected += n_frames
                self.metrics.frames_rejected.labels("descriptor_names").inc(n_frames)
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"batch {index}: descriptor_names: missing {', '.join(missing)} "
                    f"(got {clip(', '.join(names), 200) if names else 'none'})",
                )
            first_error = None
            mismatch = None
            # Spectrum frames use the batch's descriptor names; Gram frames this
            # sidecar's (it computed their descriptors).
            index_of = {n: i for i, n in enumerate(names)}
            problems = {j: validate_frame(f, len(names)) for j, f in grams}
            computed = {}
            if grams:
                # Off the event loop: other streams and RPCs go on while LAPACK runs.
                computed = await asyncio.get_running_loop().run_in_executor(
                    None, gram_spectra, [(j, f) for j, f in grams if problems[j] is None])
            names_t = tuple(names)
            risk = self.risk
            kinds = {False: (index_of, names_t, risk.batch_index(names_t) if risk is not None else None),
                     True: (INDEX, DESCRIPTOR_NAMES,
                            risk.batch_index(DESCRIPTOR_NAMES) if risk is not None and (grams or batch.columns) else None)}
            finished = []
            touched = []
            sink = [] if self.frame_sink is not None else None
            # The spectrum frames' values, checks and spike counts, a batch at a time (the hot path).
            spectra = spectrum_batch(batch.frames, refused, len(names), index_of, self.detector)
            for j, frame in enumerate(batch.frames):
                if j in refused:
                    field, why = refused[j]
                    rejected += 1
                    if field:  # over a limit: malformed (label caps are counted in eigenwatch_refused_total)
                        self.metrics.frames_rejected.labels(field).inc()
                        first_error = first_error or f"batch {index}: frames[{j}].{field}: {why}"
                    continue
                has_gram = bool(frame.centred_gram)
                if has_gram:
                    problem = problems[j]
                    got = computed.get(j)
                    if problem is None and isinstance(got, str):
                        # NaN activations, a degenerate window: nothing malformed, counted
                        self.metrics.windows_unusable.labels(frame.model, unusable_reason(got)).inc()
                        continue
                    eigs, desc = got if problem is None else (None, None)
                    spike = None
                elif j in spectra:
                    eigs, desc, problem, spike = spectra[j]
                else:
                    eigs = np.asarray(frame.eigenvalues, dtype=np.float64)
                    desc = np.asarray(frame.descriptors, dtype=np.float64)
                    problem = validate_frame(frame, len(names), eigs, desc, index_of)
                    spike = None
                if problem is not None:
                    rejected += 1
                    self.metrics.frames_rejected.labels(problem[0]).inc()
                    first_error = first_error or f"batch {index}: frames[{j}].{problem[0]}: {problem[1]}"
                    continue
                f_index, f_names, f_risk = kinds[has_gram]
                try:
                    st, done = self._apply(frame, f_index, f_names, eigs, desc, spike)
                except DimMismatch as exc:  # calibrated for other tap settings: refuse, loudly
                    rejected += 1
                    self.metrics.frames_rejected.labels("dim").inc()
                    mismatch = mismatch or f"batch {index}: frames[{j}].{exc}"
                    continue
                touched.append(st)
                if risk is not None:
                    risk.add(st, frame.model, frame.layer, frame.token_count, desc, f_risk)
                if done:
                    finished.append(st)
                if sink is not None:
                    sink.append(wire.from_proto(frame, f_names, eigs, desc))
                accepted += 1
            for k, block in enumerate(batch.columns):  # the same, column by column
                a, r, err, mis, cap = await self._columns(block, f"batch {index}: columns[{k}]", names, index_of,
                                                          kinds, touched, finished, sink)
                accepted, rejected = accepted + a, rejected + r
                first_error, mismatch, over = first_error or err, mismatch or mis, over or cap
            self._flush_window_metrics()
            if risk is not None or self.combined is not None:
                self._finished.extend(finished)
                self._score()
            if touched:
                self.store.enforce(keep=touched[-1])  # over --memory-budget-mb: evict the stalest requests
            if sink:
                self.frame_sink(sink)
            if snap_error is not None:
                first_error = first_error or f"batch {index}: {snap_error[1]}"
            if first_error is not None:
                # The valid frames of the batch were kept; the stream ends so the
                # sender sees the error (a tap reconnects and goes on).
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, first_error)
            if mismatch is not None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, mismatch)
            if over is not None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._over_message(index, over))
        return monitor_pb2.IngestSummary(frames_accepted=accepted, frames_rejected=rejected)

    def _over_message(self, index: int, why: str) -> str:
        if why == "models":
            return (f"batch {index}: model: the sidecar accepts {self.cfg.max_models} distinct models (--max-models) "
                    "and has them; frames of other models were refused (the others were kept)")
        return (f"batch {index}: layer: the sidecar accepts {self.cfg.max_layers} distinct (model, layer) pairs "
                "(--max-layers) and has them; frames of other layers were refused (the others were kept)")

    def _tap_stats(self, stats) -> None:
        if len(stats.tap_id) > MAX_ID_CHARS or len(stats.model) > MAX_LABEL_CHARS or not stats.model.isprintable():
            self.metrics.frames_rejected.labels("stats").inc()
            return
        why = self.labels.admit_model(stats.model or "unknown")
        if why is not None:
            self._refused(why)
            return
        self.metrics.taps.update(stats)

    def _snapshots(self, snaps) -> tuple[grpc.StatusCode, str] | None:
        """Direction snapshots -> the drift detector; the first malformed or refused one's
        (status, problem) (valid ones are kept)."""
        first = None
        for j, s in enumerate(snaps):
            problem = validate_snapshot(s)
            if problem is None and (len(s.model) > MAX_LABEL_CHARS or not s.model.isprintable()):
                problem = ("model", f"printable, at most {MAX_LABEL_CHARS} characters")
            if problem is None and s.layer > MAX_LAYER:
                problem = ("layer", f"must be <= {MAX_LAYER}, got {s.layer}")
            if problem is not None:
                self.metrics.direction_snapshots_rejected.labels(problem[0]).inc()
                first = first or (grpc.StatusCode.INVALID_ARGUMENT, f"directions[{j}].{problem[0]}: {problem[1]}")
                continue
            why = self.labels.admit(s.model, s.layer)
            if why is not None:
                self._refused(why)
                first = first or (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"directions[{j}]: " + self._over_message(0, why).removeprefix("batch 0: "))
                continue
            self.drift.observe(s)
        return first

    def _apply(self, f: monitor_pb2.Frame, index_of: dict[str, int], names: tuple[str, ...], eigs: np.ndarray,
               desc: np.ndarray, res: SpikeResult | None = None):
        """A Frame message -> _apply_values, then its signature and hidden-state statistics.
        Returns (state, whether this frame finished it)."""
        model = f.model
        if res is None:
            res = self.detector.observe(model, f.layer, eigs, f.window, f.dim, float(desc[index_of["sigma2"]]),
                                        float(desc[index_of["trace_mean"]]), f.engine_request_id)
        st = self._state(f.engine_request_id, f.request_id, model, f.skipped_tokens, names)
        self._apply_values(st, model, f.layer, f.window, f.dim, f.token_count, eigs, desc, res, index_of, names)
        if f.HasField("signature"):
            self.signatures.observe(st, f)  # signature_match
        if self.combined is not None and f.HasField("hidden"):
            self.combined.observe(st, f)  # the tap's hidden-state statistics (final frames)
        done = f.final and self.store.finish(st)  # the active-requests gauge follows (store.on_active)
        return st, done

    def _state(self, engine_id: str, request_id: str, model: str, skipped: int, names: tuple[str, ...]):
        """The request's state, created (and counted) on its first frame."""
        st, new = self.store.get_or_create(engine_id, request_id, model, skipped)
        if new:
            self.metrics.requests.labels(model).inc()
            st.descriptor_names = names
            if self.risk is not None:  # its GRU state and risk history (sidecar/risk.py)
                self.store.charge(st, 1024 + 16 * self.cfg.report_history)
        return st

    def _apply_values(self, st, model: str, layer: int, window: int, dim: int, count: int, eigs: np.ndarray,
                      desc: np.ndarray, res: SpikeResult, index_of: dict[str, int], names: tuple[str, ...],
                      row: int | None = None) -> None:
        """One valid frame's values (eigs [W], desc [D] float64 in `names` order) and its spike
        detector result -> request state `st` (_state), metrics (gathered, written per batch by
        _flush_window_metrics; `row`: the frame's metrics.WindowMetrics row, when the caller
        gathers its entropy and lambda1 itself, a block at a time). The one place both wire
        forms (Frame, FrameColumns) meet."""
        acc = self._window_acc
        if row is None:
            row = self._window_row(model, layer)
            acc[0].append(row)
            acc[1].append(desc[index_of["spectral_entropy"]])
            acc[2].append(desc[index_of["lambda1"]])

        ls = st.layers.get(layer)
        if ls is None:
            width = len(st.descriptor_names)
            ls = st.layers[layer] = LayerState(history=History(self.cfg.report_history, width))
            self.store.charge(st, layer_bytes(self.cfg.report_history, width, 0))
        if window > ls.window:  # last_eigenvalues: float32 [window]
            self.store.charge(st, 4 * (window - ls.window))
        ls.frames += 1
        if count > ls.token_count:
            ls.token_count = count
        ls.window, ls.dim = window, dim
        ls.last_descriptors = desc.copy()  # a row of the batch's array: keep it alone, not the whole batch
        ls.last_eigenvalues = eigs.astype(np.float32)
        if names == st.descriptor_names:  # a tap that changed descriptor versions mid-request: keep the first
            ls.history.append(count, desc)

        if res.spikes is not None:
            acc[3].append(row)
            acc[4].append(res.spikes)
            if res.spikes > ls.max_spikes:
                ls.max_spikes = res.spikes
            if self.persistence.step(ls, st.fired, (self.detector.name, layer), res.severity):
                self.alerts.raise_alert(st, self.detector.name, res.severity, res.spikes, res.threshold,
                                        f"{res.spikes} eigenvalues above the calibrated MP edge at layer {layer} "
                                        f"(threshold {int(res.threshold)})", layer, count)

    async def _columns(self, c: monitor_pb2.FrameColumns, where: str, names: list[str], index_of: dict[str, int],
                       kinds: dict, touched: list, finished: list, sink: list | None):
        """One FrameColumns block: checked as columns (check_columns, column_problems,
        bad_value_rows), spikes counted in one call, then each frame's values into
        _apply_values. Returns (accepted, rejected, first error, dim mismatch, label cap hit)."""
        n = len(c.layer)
        problem = check_columns(c, len(names))
        if problem is not None:
            self.metrics.frames_rejected.labels(problem[0]).inc(n)
            return 0, n, f"{where}.{problem[0]}: {problem[1]}", None, None
        if n == 0:
            return 0, 0, None, None, None
        model, w, grams = c.model, c.window, bool(c.centred_grams)
        layers, dims, counts = list(c.layer), list(c.dim), list(c.token_count)
        keep = np.ones(n, dtype=bool)
        rejected, first_error, over = 0, None, None
        for i, (field, why) in column_problems(np.array(layers), np.array(dims), np.array(counts)).items():
            keep[i] = False
            rejected += 1
            self.metrics.frames_rejected.labels(field).inc()
            first_error = first_error or f"{where}.{field}[{i}]: {why}"
        guard = self.labels
        for layer in set(layers):  # label admission: once per distinct layer, not per frame
            if (model, layer) in guard.pairs or not 0 <= layer <= MAX_LAYER:
                continue
            why = guard.admit(model, layer)
            if why is not None:
                out = keep & (np.array(layers) == layer)
                k = int(out.sum())
                keep &= ~out
                rejected += k
                self._refused(why, k)
                over = over or why
        if grams:
            f_index, f_names, f_risk = kinds[True]
            idx = np.flatnonzero(keep)
            eigs = np.zeros((n, w))
            desc = np.zeros((n, len(f_names)))
            if len(idx):
                g = np.frombuffer(c.centred_grams, dtype="<f4").reshape(n, w, w)[idx]
                # Off the event loop: other streams and RPCs go on while LAPACK runs.
                e, d, why = await asyncio.get_running_loop().run_in_executor(
                    None, gram_rows, g, [dims[i] for i in idx])
                eigs[idx], desc[idx] = e, d
                for i, y in zip(idx.tolist(), why):
                    if y is not None:  # NaN activations, a degenerate window: nothing malformed, counted
                        keep[i] = False
                        self.metrics.windows_unusable.labels(model, unusable_reason(y)).inc()
        else:
            f_index, f_names, f_risk = kinds[False]
            eigs = np.frombuffer(c.eigenvalues, dtype="<f4").reshape(n, w).astype(np.float64)
            desc = np.frombuffer(c.descriptors, dtype="<f8").reshape(n, len(names))
            for i in np.flatnonzero(bad_value_rows(eigs, desc, index_of) & keep).tolist():
                field, why = value_problem(eigs[i], desc[i], index_of)
                keep[i] = False
                rejected += 1
                self.metrics.frames_rejected.labels(field).inc()
                first_error = first_error or f"{where}.{field}[{i}]: {why}"
        ok = np.flatnonzero(keep).tolist()
        spikes = count_spikes(self.detector, ok, [(model, layer) for layer in layers], eigs, w, dims, desc, f_index)
        # metrics rows of admitted layers only: a refused layer must not become a series
        rows = {layer: self._window_row(model, layer) for layer in {layers[i] for i in ok}}
        row = [rows.get(layer) for layer in layers]
        req, eng, ext, skipped = list(c.request), list(c.engine_request_ids), list(c.request_ids), list(c.skipped_tokens)
        finals = set(c.final)
        steps = list(c.step) if sink is not None else None
        risk, store = self.risk, self.store
        accepted, mismatch, kept, risk_items = 0, None, [], []
        states: list = [None] * len(eng)  # a request's state, looked up once per block
        detector = self.detector
        for i in ok:
            r = req[i]
            res = spikes[i]
            if res is None:  # a layer still calibrating, another width: the detector alone
                try:
                    res = detector.observe(model, layers[i], eigs[i], w, dims[i], float(desc[i, f_index["sigma2"]]),
                                           float(desc[i, f_index["trace_mean"]]), eng[req[i]])
                except DimMismatch as exc:  # calibrated for other tap settings: refuse, loudly
                    rejected += 1
                    self.metrics.frames_rejected.labels("dim").inc()
                    mismatch = mismatch or f"{where} frame {i}: {exc}"
                    continue
            st = states[r]
            if st is None:
                st = states[r] = self._state(eng[r], ext[r], model, skipped[r], f_names)
            self._apply_values(st, model, layers[i], w, dims[i], counts[i], eigs[i], desc[i], res, f_index, f_names,
                               row[i])
            touched.append(st)
            if risk is not None:
                risk_items.append((st, layers[i], counts[i], i))
            final = i in finals
            if final and store.finish(st):
                finished.append(st)
            if sink is not None:
                sink.append(wire.Frame(
                    request_id=ext[r], engine_request_id=eng[r], model=model, layer=layers[i], step=steps[i],
                    token_count=counts[i], skipped_tokens=skipped[r], window=w, dim=dims[i],
                    eigenvalues=eigs[i].astype(np.float32), descriptors=np.array(desc[i]), final=final,
                    names=DESCRIPTOR_NAMES if tuple(f_names) == DESCRIPTOR_NAMES else tuple(f_names)))
            accepted += 1
            kept.append(i)
        if risk_items:  # before a finished request lets go of its model state (_score, risk.finish)
            risk.add_block(model, risk_items, desc, f_risk)
        if kept:  # the window metrics of the block's frames, gathered at once
            acc = self._window_acc
            acc[0].extend([row[i] for i in kept])
            acc[1].extend(desc[kept, f_index["spectral_entropy"]].tolist())
            acc[2].extend(desc[kept, f_index["lambda1"]].tolist())
        return accepted, rejected, first_error, mismatch, over

    def _score(self, now: bool = False) -> None:
        """The risk model's call for every step completed since the last one (one call per
        round, sidecar/risk.py), then the finished requests let go of their model state and
        get their combined score. Steps wait for the call at most RISK_FLUSH_S (a timer), or
        until RISK_FLUSH_REQUESTS requests have one waiting, or the stream ends: under load
        the call serves many messages, not each 64-frame one alone (bench/bench_sidecar.py)."""
        risk = self.risk
        if not now and (risk is None or risk.waiting < RISK_FLUSH_REQUESTS):
            if self._score_timer is None:
                self._score_timer = asyncio.get_running_loop().call_later(RISK_FLUSH_S, self._score, True)
            return
        if self._score_timer is not None:
            self._score_timer.cancel()
            self._score_timer = None
        finished, self._finished = self._finished, []
        if risk is not None:
            risk.flush()
            for st in finished:
                risk.finish(st)
        if self.combined is not None:
            for st in finished:  # after the risk: its max logit is one of the voters
                self.combined.finish(st)
            self.combined.flush_running()

    def _window_row(self, model: str, layer: int) -> int:
        row = self._window_rows.get((model, layer))
        if row is None:
            row = self._window_rows[(model, layer)] = self.metrics.windows.row(model, layer)
        return row

    def _risk_alert(self, st, risk: float, token_count: int) -> None:
        # layer -1: the risk reads several layers (listed in Report.risk.layers).
        self.alerts.raise_alert(st, RISK_DETECTOR, RISK_SEVERITY, risk, self.risk.th.high,
                                self.risk.alert_message(risk), -1, token_count)

    def _evicted(self, st, reason: str) -> None:
        self.metrics.requests_evicted.labels(reason).inc()
        if self.risk is not None:
            self.risk.finish(st)

    def _flush_window_metrics(self) -> None:
        # One numpy update per batch (metrics.WindowMetrics): a prometheus-client child costs a
        # lock and a bucket search per observation. Per batch, not later: a scrape sees every
        # frame ingested before it.
        acc = self._window_acc
        if acc[0]:
            self.metrics.windows.add(*acc)
            self._window_acc = ([], [], [], [], [])

    def _set_active(self, model: str) -> None:
        # Kept per model as requests start and finish: no walk over the store per new request.
        self.metrics.active_requests.labels(model).set(self.store.active.get(model, 0))

    def _calibrated(self, key, cal) -> None:
        model, layer = key
        self.metrics.calibration_sigma2.labels(model, str(layer)).set(cal.sigma2)
        log.info("calibrated %s layer %d: sigma2=%.4g spike_threshold=%d (%d frames from %d+ requests, dim %d)",
                 clip(model), layer, cal.sigma2, cal.spike_threshold, cal.frames, self.detector.calibration_requests,
                 cal.dim)
        if self._writer is not None:
            # merged with what the file held at start (a restart adds, never replaces); written off the loop
            self._writer.submit(calib.merged(self._saved, dict(self.detector.calibration)))

    # ---- WatchAlerts -----------------------------------------------------------------
    async def WatchAlerts(self, request, context):
        problem = AlertHub.check_filter(request)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        # writes with context.write (a stalled client is disconnected; alerts.py)
        await self.alerts.serve(request, context)

    async def WatchAlertBatches(self, request, context):
        problem = AlertHub.check_filter(request)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        await self.alerts.serve(request, context, batched=True)

    # ---- GetReport -------------------------------------------------------------------
    async def GetReport(self, request, context):
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        st = self.store.get(request.request_id)
        if st is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"request_id: no monitored request {clip(request.request_id)} (never seen, opted out, or evicted)",
            )
        if self._score_timer is not None:  # steps waiting for the batched risk call: a report shows them scored
            self._score(now=True)
        wanted = set(request.layers)
        layers = sorted((l, ls) for l, ls in st.layers.items() if not wanted or l in wanted)
        limit = request.history_limit or None
        # The reply's size, bounded from above, before anything is built: a report over gRPC's
        # message limit would be built, then refused by gRPC, on every retry.
        width = len(st.descriptor_names or DESCRIPTOR_NAMES)
        size = 4096 + sum(len(a.message) + len(a.request_id) + len(a.engine_request_id) + 128 for a in st.alerts)
        for _, ls in layers:
            rows = ls.history.n if ls.history is not None else 0
            rows = min(rows, limit) if limit else rows
            size += 64 + 9 * width + 5 * ls.window + rows * (16 + 9 * width)
        if size > wire.MAX_MESSAGE_BYTES - REPORT_MARGIN:
            self._refused("report_size")
            per_layer = (size - 4096) // max(1, len(layers))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"GetReport: the report of {clip(request.request_id)} would take ~{size >> 20} MiB ({len(layers)} "
                f"layers, ~{per_layer >> 10} KiB each), over the {wire.MAX_MESSAGE_BYTES >> 20} MiB message limit; "
                "ask for fewer layers (GetReportRequest.layers) or a shorter history (history_limit)")
        # A consistent copy here, on the loop (array copies); the message is built on a worker thread.
        snap = []
        for layer, ls in layers:
            counts = values = None
            if ls.history is not None:
                counts, values = ls.history.items()
                if limit:
                    counts, values = counts[-limit:], values[-limit:]
                counts, values = counts.copy(), values.copy()
            snap.append((layer, ls.frames, ls.token_count, ls.window, ls.dim, ls.last_descriptors,
                         ls.last_eigenvalues, ls.max_spikes, counts, values))
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
        if self.risk is not None and st.risk is not None:
            rep.risk.CopyFrom(self.risk.report(st.risk))
            if limit and len(rep.risk.history) > limit:
                del rep.risk.history[:-limit]
        self.signatures.report(st, rep)
        if st.combined is not None and st.combined.report is not None:
            rep.combined.CopyFrom(st.combined.report)
        if sum(len(s[8]) for s in snap if s[8] is not None) < 64:
            _layer_reports(rep, snap)  # small: quicker here than a hop to a thread
            return rep
        async with self._reports:  # a client looping big reports gets at most this many threads
            await asyncio.get_running_loop().run_in_executor(None, _layer_reports, rep, snap)
        return rep

    def embedding_alert(self, e, out) -> None:
        """A tap embedding the shield rejected (shield_service.py): the request's
        shield_energy alert, once per request and layer. Its state is created when
        no frame of it arrived yet (a pooled request's embedding can come first)."""
        if self.labels.admit_model(e.model) is not None:
            return  # over --max-models: counted where its frames are refused
        st, new = self.store.get_or_create(e.engine_request_id or e.request_id, e.request_id, e.model, 0)
        if new:
            self.metrics.requests.labels(e.model).inc()
        key = (ENERGY_DETECTOR, e.layer)
        if key in st.fired:
            return
        st.fired[key] = monitor_pb2.SEVERITY_WARNING
        where = "the pooled output" if e.layer < 0 else f"layer {e.layer}'s mean state"
        self.alerts.raise_alert(st, ENERGY_DETECTOR, monitor_pb2.SEVERITY_WARNING, out.score, out.threshold,
                                f"{where} scores {out.score:.3g} outside the shield's subspace (threshold "
                                f"{out.threshold:.3g}; energy {out.energy:.3g})", e.layer, 0)

    async def sweep_forever(self, every_s: float = 30.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.store.sweep()  # silent requests closed (the active gauge follows through store.on_active)
            self.detector.sweep(self.cfg.idle_timeout_s)  # calibration buffers of layers that went away
            self.store.enforce()

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._writer.close)


def _layer_reports(rep: monitor_pb2.Report, snap) -> None:
    """LayerReports from copies of the layers' state (GetReport); safe on a worker thread."""
    for layer, frames, token_count, window, dim, last_desc, last_eigs, max_spikes, counts, values in snap:
        lr = rep.layers.add(
            layer=layer, frames=frames, token_count=token_count, window=window, dim=dim,
            last_descriptors=[] if last_desc is None else last_desc.tolist(),
            last_eigenvalues=[] if last_eigs is None else last_eigs.tolist(), max_spikes=max_spikes)
        if counts is not None:
            hist = lr.history
            for c, v in zip(counts.tolist(), values.tolist()):
                hist.add(token_count=c, descriptors=v)


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

    def __init__(self, token: str, services: tuple[str, ...] = (SERVICE_NAME, SHIELD_SERVICE_NAME, SPARSE_SERVICE_NAME)):
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


class Undecodable:
    """Bytes that are not the method's message: INVALID_ARGUMENT with a short message, counted
    (eigenwatch_refused_total{reason="undecodable"}), logged once per client a minute."""

    def __init__(self, metrics: Metrics, every_s: float = UNDECODABLE_LOG_EVERY_S, max_clients: int = 1024):
        self.metrics = metrics
        self.every_s = every_s
        self.max_clients = max_clients
        self._last: dict[str, float] = {}  # peer -> when it was last logged
        self._suppressed: dict[str, int] = {}

    async def __call__(self, context, method: str, type_name: str, exc: Exception) -> None:
        self.metrics.refused.labels("undecodable").inc()
        peer = context.peer() or "unknown"
        now = time.monotonic()
        last = self._last.get(peer)
        if last is None or now - last >= self.every_s:
            if len(self._last) >= self.max_clients and last is None:
                self._last.clear()  # many clients: at worst one more line each
                self._suppressed.clear()
            self._last[peer] = now
            more = self._suppressed.pop(peer, 0)
            log.warning("%s: undecodable %s from %s (%s)%s; answered INVALID_ARGUMENT (at most one line a minute "
                        "per client)", method, type_name, clip(peer), clip(f"{type(exc).__name__}: {exc}", 120),
                        f", and {more} more since the last line" if more else "")
        else:
            self._suppressed[peer] = self._suppressed.get(peer, 0) + 1
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{method}: the request is not a valid {type_name} message ({type(exc).__name__}); "
                            "send the message of the method's proto (eigenwatch/v1/*.proto)")


def _decoder(cls, method: str, on_error):
    type_name = cls.DESCRIPTOR.full_name
    from_string = cls.FromString

    async def decode(raw: bytes, context):
        try:
            return from_string(raw)
        except Exception as exc:  # DecodeError, and whatever else a parser of hostile bytes raises
            await on_error(context, method, type_name, exc)

    async def decode_stream(raw_iter, context):
        async for raw in raw_iter:
            try:
                msg = from_string(raw)
            except Exception as exc:
                await on_error(context, method, type_name, exc)
            yield msg

    return decode, decode_stream


def add_service(server, servicer, service_name: str, on_undecodable) -> None:
    """Register `servicer`'s methods of the proto service `service_name` with raw-bytes requests,
    decoded inside the handler: grpc.aio answers a deserializer that raises with UNKNOWN and
    logs a traceback per message; here bad bytes get `on_undecodable` (INVALID_ARGUMENT)."""
    service = descriptor_pool.Default().FindServiceByName(service_name)
    handlers = {}
    for m in service.methods:
        req_cls, resp_cls = GetMessageClass(m.input_type), GetMessageClass(m.output_type)
        impl = getattr(servicer, m.name)
        decode, decode_stream = _decoder(req_cls, m.name, on_undecodable)
        if m.client_streaming and m.server_streaming and inspect.isasyncgenfunction(impl):
            async def handler(raw_iter, context, impl=impl, decode_stream=decode_stream):
                async for item in impl(decode_stream(raw_iter, context), context):
                    yield item
        elif m.client_streaming:
            async def handler(raw_iter, context, impl=impl, decode_stream=decode_stream):
                return await impl(decode_stream(raw_iter, context), context)
        elif m.server_streaming and inspect.isasyncgenfunction(impl):
            async def handler(raw, context, impl=impl, decode=decode):
                request = await decode(raw, context)
                async for item in impl(request, context):
                    yield item
        else:
            async def handler(raw, context, impl=impl, decode=decode):
                result = impl(await decode(raw, context), context)
                return await result if inspect.isawaitable(result) else result
        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(handler, request_deserializer=None, response_serializer=resp_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


class Sidecar:
    """A running sidecar: gRPC server + /metrics. Use `await start()`, `await stop()`."""

    def __init__(self, cfg: SidecarConfig, detector: SpikeDetector | None = None,
                 registry: CollectorRegistry | None = None, risk: LiveRiskSetup | None = None, frame_sink=None,
                 shield: LoadedShield | None = None):
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.detector = detector or SpikeDetector(
            calibration_frames=cfg.calibration_frames, quantile=cfg.quantile, spike_threshold=cfg.spike_threshold,
            calibration_requests=cfg.calibration_requests,
        )
        self.service = MonitorService(cfg, self.detector, self.metrics, risk, frame_sink)
        # shield: cfg.shield loaded already (run() checks it before serving); else loaded here
        self.shield_service = ShieldService(cfg, self.metrics, shield, on_rejected=self.service.embedding_alert)
        self.service.embedding_sink = self.shield_service.on_embeddings
        self.sparse_service = SparseService(cfg)  # --sparse-head (SignatureFileError)
        self.service.signatures.use_vocab(self.sparse_service.head)
        self._undecodable = Undecodable(self.metrics)
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
        security = tls.load(self.cfg)  # token, TLS files, the listen rule: SecurityError names the flag
        self.server = grpc.aio.server(
            interceptors=[TokenAuth(security.token)] if security.token else None,
            options=[
                ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
            ]
        )
        # Each service's messages are decoded inside its handlers (add_service): bytes that are
        # not the method's message get INVALID_ARGUMENT, not UNKNOWN and a traceback.
        for servicer, name in ((self.service, SERVICE_NAME), (self.shield_service, SHIELD_SERVICE_NAME),
                               (self.sparse_service, SPARSE_SERVICE_NAME)):
            add_service(self.server, servicer, name, self._undecodable)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, SHIELD_SERVICE_NAME, SPARSE_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        try:
            self.port = security.bind(self.server, self.cfg.listen)  # TLS when configured; unix sockets 0600
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
        await health_servicer.set(SPARSE_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING  # needs --sparse-head
                                  if self.sparse_service.loaded else health_pb2.HealthCheckResponse.NOT_SERVING)
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
        await self.sparse_service.close()
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
    # Everything loaded so far (modules, the risk model, the calibration) lives as long as the
    # process: out of the collector's generations, so a full pass walks only request state
    # (a pause of tens of ms otherwise, in the p99 of alert delivery; bench_sidecar.py).
    gc.collect()
    gc.freeze()
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
                                 cfg.spike_threshold, cfg.calibration_requests)
        if cfg.save_calibration:
            calib.load_for_saving(cfg.save_calibration)  # a file there that is not a calibration: exit 2 now
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
    except (OSError, tls.SecurityError, SignatureFileError) as exc:
        print(f"eigenwatch sidecar: {exc}", file=sys.stderr)
        return 2
    return 0
