"""The eigenwatch.v1.Shield service: EigenShield's Filter and GetShield over gRPC
(numpy, no torch), with the --shield file reloaded off the event loop when it
changes; and WatchEmbeddings: taps' pooled embeddings (hooks/embeddings.py)
filtered by the same shield, streamed to subscribers, with the `shield_energy`
detector alerting on the rows the shield rejects."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import grpc
import numpy as np

from eigenwatch.hooks.frames import MAX_MESSAGE_BYTES
from eigenwatch.kernels import shield as S
from eigenwatch.v1 import shield_pb2, shield_pb2_grpc

from ..process import keep_freed_memory, limit_blas_threads, openblas_set_threads  # noqa: F401 (re-exported)
from .config import SidecarConfig
from .metrics import Metrics

log = logging.getLogger("eigenwatch.sidecar.shield")

SERVICE_NAME = shield_pb2.DESCRIPTOR.services_by_name["Shield"].full_name
RESULTS = ("ok", "invalid_argument", "failed_precondition", "error")
EMBEDDING_RESULTS = ("filtered", "rejected", "no_shield", "dim_mismatch", "invalid")
ENERGY_DETECTOR = "shield_energy"
WATCH_QUEUE = 256  # filtered embeddings a slow watcher may fall behind before it loses the oldest
MAX_EMBEDDING_WATCHERS = 64
MAX_EMBEDDING_DIM = 1 << 16
NO_SHIELD = "no shield loaded: start the sidecar with --shield PATH (a file from `eigenwatch shield fit`)"


class ShieldLoadError(ValueError):
    """A --shield file that cannot be served; the message names the flag, the file and the fix."""


def file_signature(path: str) -> tuple[int, int, int] | None:
    """(inode, size, mtime ns): changes when the file is replaced or rewritten. None when absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:  # unreadable directory: a state of its own, so it is reported once
        return -1, -1, exc.errno or 0
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class Loaded:
    """A shield and what Filter needs with it. A call reads `ShieldService.current`
    once, so a reload swaps the whole snapshot and never changes a call halfway."""

    shield: S.Shield
    threshold: float  # reject rows whose score is above this
    signature: tuple | None  # the file's, before it was read
    info: shield_pb2.ShieldInfo


def load_shield(cfg: SidecarConfig, generation: int = 1) -> Loaded:
    """Read and check cfg.shield. Blocking: runs at start and, on reload, on a
    worker thread. Raises ShieldLoadError naming --shield."""
    path = cfg.shield
    signature = file_signature(path)
    try:
        shield = S.load(path)
    except FileNotFoundError:
        raise ShieldLoadError(f"--shield: no such file {path!r}; write one with `eigenwatch shield fit --out`") from None
    except S.ShieldFileError as exc:
        raise ShieldLoadError(f"--shield: {exc}") from None
    except OSError as exc:  # a directory, no permission
        raise ShieldLoadError(f"--shield: cannot read {path!r}: {exc.strerror or exc}") from None
    if cfg.shield_threshold is not None:
        threshold, quantile = float(cfg.shield_threshold), 0.0
    elif shield.calib_scores.size == 0:
        raise ShieldLoadError(f"--shield: {path} carries no calibration scores (a version-1 file): refit it with "
                              "`eigenwatch shield fit`, or pass --shield-threshold SCORE")
    else:
        quantile = cfg.shield_quantile
        threshold = S.score_threshold(shield, quantile)
        if math.isinf(threshold):
            log.warning("--shield: %s has %d calibration scores, too few for --shield-quantile %g: Filter rejects "
                        "nothing (needs at least %d)", path, shield.calib_scores.size, quantile,
                        math.ceil(quantile / (1 - quantile)))
    shield.project(np.zeros((1, shield.dim), dtype=np.float32))  # builds the float32 operands now, off the loop
    info = shield_pb2.ShieldInfo(
        path=os.path.abspath(path), loaded_unix_s=time.time(), generation=generation, dim=shield.dim,
        spikes=int(shield.spike_vectors.shape[1]), rank=shield.rank, data_sha256=shield.data_sha256,
        reference_rows=shield.n_rows, resid_mean=shield.resid_mean, threshold=threshold, quantile=quantile,
        calibration_rows=int(shield.calib_scores.size),
        fit_config=json.dumps(asdict(shield.config), sort_keys=True),
    )
    return Loaded(shield, threshold, signature, info)


def check_request(req: shield_pb2.FilterRequest, dim: int, max_rows: int) -> str | None:
    """What is wrong with a request's shape, naming the field; None when nothing is."""
    if req.rows == 0:
        return f"rows: the batch is empty; send 1..{max_rows} rows of {dim} float32 values"
    if req.rows > max_rows:
        return f"rows: {req.rows} is over --shield-max-rows {max_rows}; split the batch (accepted: 1..{max_rows})"
    if req.dim != dim:
        return f"dim: the loaded shield takes rows of dim {dim}, got {req.dim}"
    want = 4 * req.rows * req.dim
    if len(req.embeddings) != want:
        return (f"embeddings: has {len(req.embeddings)} bytes but rows x dim x 4 = {want} "
                f"(float32 little-endian, row-major [rows x dim])")
    # The reply carries the rows back plus ~9 bytes per row (energy, score, verdict): it must fit too.
    reply = (0 if req.omit_filtered else want) + 16 * req.rows + 1024
    if reply > MAX_MESSAGE_BYTES:
        return (f"rows: the reply to {req.rows} rows of dim {req.dim} would take ~{reply} bytes, over the "
                f"{MAX_MESSAGE_BYTES}-byte gRPC message limit; split the batch or set omit_filtered")
    return None


def filter_rows(cur: Loaded, req: shield_pb2.FilterRequest) -> shield_pb2.FilterResponse | str:
    """The reply for a well-shaped request, or what is wrong with its values."""
    x = np.frombuffer(req.embeddings, dtype="<f4").reshape(req.rows, req.dim)  # [B, d], no copy
    y, energy, score = S.project(cur.shield, x)  # float32 math; NaN/Inf rows give non-finite energy
    bad = ~np.isfinite(energy)
    if bad.any():
        # Checked on the output so clean batches pay no extra pass over x.
        rows = np.flatnonzero(bad & ~np.isfinite(x).all(axis=1))
        if rows.size:
            return (f"embeddings: row {rows[0]} contains NaN or Inf ({rows.size} row(s) do); "
                    f"accepted: finite float32 values")
        return (f"embeddings: row {np.flatnonzero(bad)[0]} is too large: its energy overflows float32; "
                f"accepted: values of the scale the shield was fitted on")
    rejected = score > cur.threshold  # [B] bool
    n_rejected = int(np.count_nonzero(rejected))
    return shield_pb2.FilterResponse(
        filtered=b"" if req.omit_filtered else y.astype("<f4", copy=False).tobytes(),
        rows=req.rows, dim=req.dim, energy=energy.tolist(), score=score.tolist(), rejected=rejected.tolist(),
        rejected_rows=n_rejected, threshold=cur.threshold, data_sha256=cur.shield.data_sha256,
    )


def check_embedding(e) -> str | None:
    """What is wrong with a tap's PooledEmbedding, naming the field; None when nothing is."""
    if not 1 <= e.dim <= MAX_EMBEDDING_DIM:
        return f"dim: expected 1..{MAX_EMBEDDING_DIM}, got {e.dim}"
    if len(e.vector) != 4 * e.dim:
        return f"vector: has {len(e.vector)} bytes but 4 x dim = {4 * e.dim} (float32 little-endian)"
    return None


class _EmbeddingWatcher:
    __slots__ = ("queue", "model", "rejected_only")

    def __init__(self, request: shield_pb2.WatchEmbeddingsRequest):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=WATCH_QUEUE)
        self.model, self.rejected_only = request.model, request.rejected_only


class ShieldService(shield_pb2_grpc.ShieldServicer):
    def __init__(self, cfg: SidecarConfig, metrics: Metrics, loaded: Loaded | None = None, on_rejected=None):
        self.cfg = cfg
        self.metrics = metrics
        # on_rejected(embedding, FilteredEmbedding): raises the request's shield_energy alert (the Monitor
        # service owns request state and alert fan-out); None: count only.
        self.on_rejected = on_rejected
        self._watchers: dict[int, _EmbeddingWatcher] = {}
        self._embedding_results = {r: metrics.embeddings.labels(r) for r in EMBEDDING_RESULTS}
        if loaded is None and cfg.shield:
            loaded = load_shield(cfg)  # raises ShieldLoadError
        self.current: Loaded | None = None
        self._seen = loaded.signature if loaded is not None else None  # the file state last acted on
        self._calls = {r: metrics.filter_calls.labels(r) for r in RESULTS}  # every result exported from 0
        for r in ("ok", "error"):
            metrics.shield_reloads.labels(r)
        # Filter's numpy work runs on this thread, not on the event loop: BLAS and
        # numpy's big loops release the GIL, so other RPCs (Ingest) go on meanwhile.
        # One thread, BLAS at --blas-threads (1 by default): a Filter takes one core and
        # concurrent calls queue; to filter more, run more sidecars (its own service).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eigenwatch-filter")
        self._swap(loaded)

    @property
    def loaded(self) -> bool:
        return self.current is not None

    def _swap(self, loaded: Loaded | None) -> None:
        self.current = loaded  # one attribute store on the loop: atomic for every call
        self.metrics.shield_rank.set(loaded.shield.rank if loaded else 0)
        self.metrics.shield_threshold.set(loaded.threshold if loaded else math.inf)

    # ---- Filter --------------------------------------------------------------------
    async def Filter(self, request, context):
        t0 = time.perf_counter()
        cur = self.current
        if cur is None:
            self._calls["failed_precondition"].inc()
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_SHIELD)
        problem = check_request(request, cur.shield.dim, self.cfg.shield_max_rows)
        if problem is None:
            try:
                out = await asyncio.get_running_loop().run_in_executor(self._pool, filter_rows, cur, request)
            except Exception:
                self._calls["error"].inc()
                log.exception("Filter failed on a %d x %d batch", request.rows, request.dim)
                raise
            if isinstance(out, str):
                problem = out
        if problem is not None:
            self._calls["invalid_argument"].inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        m = self.metrics
        self._calls["ok"].inc()
        m.filter_rows.inc(out.rows)
        if out.rejected_rows:
            m.filter_rejected_rows.inc(out.rejected_rows)
        m.filter_seconds.observe(time.perf_counter() - t0)
        return out

    # ---- taps' embeddings -----------------------------------------------------------
    def on_embeddings(self, embeddings) -> str | None:
        """A batch's PooledEmbeddings (on the event loop, from Ingest): filter each
        with the loaded shield, fan it out, alert on rejected rows. One row is a few
        d×rank products: cheap enough inline. Returns the first malformed one's
        problem (the others are kept), for Ingest to report."""
        cur = self.current
        first = None
        now = time.time()
        for j, e in enumerate(embeddings):
            problem = check_embedding(e)
            if problem is not None:
                self._embedding_results["invalid"].inc()
                first = first or f"embeddings[{j}].{problem}"
                continue
            if cur is None:
                self._embedding_results["no_shield"].inc()  # nothing to filter with: never streamed raw
                continue
            if e.dim != cur.shield.dim:
                self._embedding_results["dim_mismatch"].inc()
                continue
            x = np.frombuffer(e.vector, dtype="<f4").reshape(1, e.dim)
            y, energy, score = S.project(cur.shield, x)
            if not (np.isfinite(energy[0]) and np.isfinite(score[0])):
                self._embedding_results["invalid"].inc()
                first = first or f"embeddings[{j}].vector: NaN, Inf or overflowing values"
                continue
            rejected = bool(score[0] > cur.threshold)
            self._embedding_results["rejected" if rejected else "filtered"].inc()
            out = shield_pb2.FilteredEmbedding(
                request_id=e.request_id, engine_request_id=e.engine_request_id, model=e.model, layer=e.layer,
                dim=e.dim, filtered=y.astype("<f4", copy=False).tobytes(), energy=float(energy[0]),
                score=float(score[0]), rejected=rejected, threshold=cur.threshold,
                data_sha256=cur.shield.data_sha256, time=now)
            self._fan_out(out)
            if rejected and self.on_rejected is not None:
                self.on_rejected(e, out)
        return first

    def _fan_out(self, out: shield_pb2.FilteredEmbedding) -> None:
        for w in self._watchers.values():  # nothing here awaits: the dict cannot change meanwhile
            if (w.model and w.model != out.model) or (w.rejected_only and not out.rejected):
                continue
            if w.queue.full():  # a slow watcher loses its oldest, never blocks ingest
                w.queue.get_nowait()
                self.metrics.embeddings_dropped.inc()
            w.queue.put_nowait(out)

    async def WatchEmbeddings(self, request, context):
        if len(self._watchers) >= MAX_EMBEDDING_WATCHERS:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{MAX_EMBEDDING_WATCHERS} WatchEmbeddings streams are open; close one first")
        w = _EmbeddingWatcher(request)
        key = id(w)
        self._watchers[key] = w
        self.metrics.embedding_watchers.inc()
        try:
            while True:
                yield await w.queue.get()
        finally:
            del self._watchers[key]
            self.metrics.embedding_watchers.dec()

    # ---- GetShield -----------------------------------------------------------------
    async def GetShield(self, request, context):
        cur = self.current
        if cur is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_SHIELD)
        return cur.info

    # ---- hot reload ----------------------------------------------------------------
    async def watch_forever(self) -> None:
        """Look at the --shield file every --shield-reload-s seconds; reload it when it changed."""
        every = self.cfg.shield_reload_s
        if not self.cfg.shield or every <= 0:
            return
        while True:
            await asyncio.sleep(every)
            try:
                await self.check_reload()
            except Exception:  # the watcher must outlive any surprise; the old shield serves on
                self.metrics.shield_reloads.labels("error").inc()
                log.exception("--shield: reload check failed; keeping the loaded shield")

    async def check_reload(self) -> None:
        """One look: a stat on the loop (cheap); a changed file is read on a worker
        thread and swapped in whole. A file that fails keeps the old shield and is
        logged and counted once, until it changes again."""
        path = self.cfg.shield
        sig = file_signature(path)
        if sig == self._seen:
            return
        if sig is None:
            self._seen = None
            self.metrics.shield_reloads.labels("error").inc()
            log.error("--shield: %s is gone; keeping the shield loaded before (%s)", path, self._describe())
            return
        generation = self.current.info.generation + 1 if self.current else 1
        try:
            loaded = await asyncio.get_running_loop().run_in_executor(None, load_shield, self.cfg, generation)
        except ShieldLoadError as exc:
            if file_signature(path) != sig:
                return  # still being written: look again next time
            self._seen = sig
            self.metrics.shield_reloads.labels("error").inc()
            log.error("%s; keeping the shield loaded before (%s)", exc, self._describe())
            return
        if loaded.signature != sig or file_signature(path) != sig:
            return  # changed while being read: look again next time
        self._seen = sig
        old = self.current
        self._swap(loaded)
        self.metrics.shield_reloads.labels("ok").inc()
        log.info("--shield: reloaded %s: dim %d, rank %d, data sha256 %s, threshold %.4g (was %s)", path,
                 loaded.shield.dim, loaded.shield.rank, loaded.shield.data_sha256[:12], loaded.threshold,
                 f"dim {old.shield.dim}, rank {old.shield.rank}, sha256 {old.shield.data_sha256[:12]}" if old else "none")
        if old is not None and old.shield.dim != loaded.shield.dim:
            log.warning("--shield: the new shield takes rows of dim %d, the old one %d: clients sending %d get "
                        "INVALID_ARGUMENT", loaded.shield.dim, old.shield.dim, old.shield.dim)

    def _describe(self) -> str:
        cur = self.current
        if cur is None:
            return "none"
        return f"dim {cur.shield.dim}, rank {cur.shield.rank}, data sha256 {cur.shield.data_sha256[:12]}"

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)
