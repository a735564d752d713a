"""Frames out of the host process: a bounded queue drained by one background
thread into the sidecar's Ingest client stream.

The host (vLLM's engine thread) only calls `submit`, which never blocks and
never raises: a full queue or an absent sidecar drops frames and counts them.
The thread turns each step's seeds into wire frames, reconnects with backoff
when the sidecar goes away, and while it is away discards what piles up, so
nothing stale is replayed and memory stays bounded.

Two wire forms (TapConfig.spectra): with `grams=True` a frame carries its
window's centred Gram and the sidecar computes eigenvalues and descriptors
(the serving process only copies bytes: measured in bench/bench_overhead.py,
see the README); otherwise this thread computes them (hooks/windows.py
`to_frames`) and frames carry the W eigenvalues and the descriptors. Either
way a message carries its frames column by column (FrameColumns), and steps
that queued up while the last message went out share the next one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, replace

import grpc
import numpy as np
import torch

from eigenwatch.kernels.descriptors import DESCRIPTOR_NAMES
from eigenwatch.v1 import monitor_pb2, monitor_pb2_grpc

from . import frames as wire
from .config import ClientSecurity
from .windows import FrameSeed, hidden_values, to_frames

log = logging.getLogger("eigenwatch.tap")

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass
class TapCounters:
    frames_emitted: int = 0
    frames_dropped: int = 0
    frames_sent: int = 0
    hook_errors: int = 0
    rows_seen: int = 0
    requests_untracked: int = 0
    requests_opted_out: int = 0
    bad_options: int = 0
    reconnects: int = 0
    snapshots_sent: int = 0  # direction snapshots (hooks/sketches.py)
    snapshots_dropped: int = 0
    embeddings_sent: int = 0  # pooled embeddings (hooks/embeddings.py)
    embeddings_dropped: int = 0


class _Sketches(list):
    """A queue item of finished sketch windows (hooks/sketches.SketchWindow), not frame seeds."""


class _Embeddings(list):
    """A queue item of finished requests' pooled embeddings (hooks/embeddings.Pooled)."""


# A FrameBatch is cut at about this many bytes of Grams (a step of 512 requests ×
# 3 layers at W = 64 would otherwise pass the message limit).
BATCH_GRAM_BYTES = 4 << 20
# Queued steps are merged into one FrameBatch up to about this many frames.
MERGE_SEEDS = 1024


class FrameExporter:
    def __init__(self, target: str, model: str, max_batches: int = 256, tap_id: str | None = None,
                 token: str | None = None, grams: bool = False, security: ClientSecurity | None = None):
        self.target = target
        self.grams = grams
        # Token and TLS files from EIGENWATCH_TOKEN(_FILE) / EIGENWATCH_TLS_* unless given: a bad
        # setting raises ValueError naming the variable here, at install, never later.
        security = security if security is not None else ClientSecurity.from_env()
        if token is not None:
            security = replace(security, token=token)
        self.security = security
        self._metadata = security.metadata()
        self.model = model
        self.tap_id = tap_id or uuid.uuid4().hex[:12]
        self.counters = TapCounters()
        self._queue: queue.Queue[list[FrameSeed]] = queue.Queue(maxsize=max_batches)
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._lock = threading.Lock()  # counters touched by two threads
        self._generation = 0  # bumped per stream, so a dead stream's generator exits
        self._high_water = 0  # the deepest the queue has been, in batches (stats: queue_high_water)
        self._last_error, self._last_error_at = "", -1e9
        self._thread = threading.Thread(target=self._run, name="eigenwatch-export", daemon=True)
        self._thread.start()

    # ---- host side: never blocks, never raises -------------------------------------
    def submit(self, seeds: list[FrameSeed]) -> None:
        if not seeds:
            return
        with self._lock:
            self.counters.frames_emitted += len(seeds)
        try:
            self._queue.put_nowait(seeds)
        except queue.Full:
            self._count_dropped(len(seeds))
            return
        depth = self._queue.qsize()
        if depth > self._high_water:  # a racy max is fine: it is a gauge for operators and tests
            self._high_water = depth

    def submit_sketches(self, windows: list) -> None:
        """Finished top-direction windows; their directions are estimated on the exporter thread (on CUDA
        that is the one host read per window). Never blocks, never raises."""
        if not windows:
            return
        try:
            self._queue.put_nowait(_Sketches(windows))
        except queue.Full:
            with self._lock:
                self.counters.snapshots_dropped += len(windows)

    def submit_embeddings(self, pooled: list) -> None:
        """Finished requests' pooled embeddings (read to the host on the exporter thread). Never blocks,
        never raises."""
        if not pooled:
            return
        try:
            self._queue.put_nowait(_Embeddings(pooled))
        except queue.Full:
            with self._lock:
                self.counters.embeddings_dropped += len(pooled)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def stats(self) -> dict:
        with self._lock:
            out = dict(vars(self.counters))
        out.update(tap_id=self.tap_id, connected=self.connected, queued_batches=self._queue.qsize(), target=self.target,
                   queue_high_water=self._high_water, queue_bound=self._queue.maxsize)
        return out

    def close(self, timeout: float = 5.0) -> None:
        """Stop after sending what is queued (up to `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and self.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 0.5)

    # ---- exporter thread -------------------------------------------------------------
    def _count_dropped(self, n: int) -> None:
        with self._lock:
            self.counters.frames_dropped += n

    def _discard_queued(self) -> None:
        while True:
            try:
                self._drop_item(self._queue.get_nowait())
            except queue.Empty:
                return

    def _drop_item(self, item) -> None:
        if isinstance(item, _Sketches):
            with self._lock:
                self.counters.snapshots_dropped += len(item)
        elif isinstance(item, _Embeddings):
            with self._lock:
                self.counters.embeddings_dropped += len(item)
        else:
            self._count_dropped(len(item))

    def _snapshot_batch(self, windows: list) -> monitor_pb2.FrameBatch:
        snaps = []
        for w in windows:
            try:
                v = w.directions()  # [k, d] float32
            except Exception:  # e.g. a window whose sketch saw only NaN rows: counted, never sent
                with self._lock:
                    self.counters.snapshots_dropped += 1
                log.debug("eigenwatch: no directions for layer %d's window", w.layer, exc_info=True)
                continue
            snaps.append(monitor_pb2.DirectionSnapshot(
                model=self.model, layer=w.layer, tokens_seen=w.tokens_seen, window_tokens=w.window_tokens,
                rows=w.rows, dim=v.shape[1], k=v.shape[0], directions=v.astype("<f4", copy=False).tobytes()))
        with self._lock:
            self.counters.snapshots_sent += len(snaps)
        return monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, directions=snaps, stats=self._stats_proto())

    def _embedding_batch(self, pooled: list) -> monitor_pb2.FrameBatch:
        out = []
        for p in pooled:
            try:
                v = p.vector()  # [d] float32; on CUDA waits for vLLM's copy (this thread only)
            except Exception:
                with self._lock:
                    self.counters.embeddings_dropped += 1
                log.debug("eigenwatch: could not read the embedding of %s", p.request_id, exc_info=True)
                continue
            out.append(monitor_pb2.PooledEmbedding(
                request_id=p.request_id, engine_request_id=p.engine_request_id, model=self.model, layer=p.layer,
                dim=v.shape[0], vector=v.astype("<f4", copy=False).tobytes(), tokens=p.tokens))
        with self._lock:
            self.counters.embeddings_sent += len(out)
        return monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, embeddings=out, stats=self._stats_proto())

    def _stats_proto(self) -> monitor_pb2.TapStats:
        with self._lock:
            c = self.counters
            return monitor_pb2.TapStats(
                tap_id=self.tap_id,
                model=self.model,
                frames_emitted=c.frames_emitted,
                frames_dropped=c.frames_dropped,
                frames_sent=c.frames_sent,
                hook_errors=c.hook_errors,
                rows_seen=c.rows_seen,
                requests_untracked=c.requests_untracked,
                requests_opted_out=c.requests_opted_out,
                bad_options=c.bad_options,
                embeddings_sent=c.embeddings_sent,
                embeddings_dropped=c.embeddings_dropped,
            )

    def _batches(self, seeds: list[FrameSeed]) -> list[monitor_pb2.FrameBatch]:
        if self.grams:
            return self._gram_batches(seeds)
        frames, failed = to_frames(seeds, self.model)  # one batched eigensolve for the step
        for seed, why in failed:  # NaN activations, degenerate windows: counted, never sent
            log.debug("eigenwatch: dropped a frame of %s layer %d: %s", seed.request_id, seed.layer, why)
        if failed:
            self._count_dropped(len(failed))
        return [wire.batch(frames)]  # the stats go on in _requests, once these frames are counted

    def _gram_batches(self, seeds: list[FrameSeed]) -> list[monitor_pb2.FrameBatch]:
        """Frames that carry their centred Gram × scale (the sidecar computes the rest), column
        by column (FrameColumns, one block per window size); a final frame with a signature or
        hidden-state statistics as a Frame message."""
        grams = [s.gram for s in seeds]
        if grams[0].device.type != "cpu":  # one copy to the host for the whole step
            grams = list(torch.stack(grams).cpu())
        out, chunk, size = [], [], 0
        for s, g in zip(seeds, grams):
            v = s.valid
            chunk.append((s, (g.numpy()[:v, :v] * np.float32(s.scale)).astype("<f4", copy=False)))
            size += 4 * v * v
            if size >= BATCH_GRAM_BYTES:
                out.append(self._gram_batch(chunk))
                chunk, size = [], 0
        if chunk or not out:
            out.append(self._gram_batch(chunk))
        return out

    def _gram_batch(self, chunk: list) -> monitor_pb2.FrameBatch:
        # The sidecar applies a batch's Frame messages before its column blocks: a request
        # with a signature or statistics on any of its frames here sends all of them as
        # Frame messages, in order (frames.rich_requests).
        rich_ids = wire.rich_requests(s for s, _ in chunk)
        plain = [(s, cov) for s, cov in chunk if s.engine_request_id not in rich_ids]
        rich = [(s, cov) for s, cov in chunk if s.engine_request_id in rich_ids]
        covs = {id(s): cov for s, cov in plain}
        hidden = hidden_values([s for s, _ in rich])  # all of them at once
        frames = [monitor_pb2.Frame(
            request_id=s.request_id, engine_request_id=s.engine_request_id, model=self.model, layer=s.layer,
            step=s.step, token_count=s.token_count, skipped_tokens=s.skipped_tokens, window=s.valid, dim=s.dim,
            final=s.final, centred_gram=cov.tobytes(), signature=wire.sparse_terms(s.signature),
            hidden=wire.hidden_stats(h)) for (s, cov), h in zip(rich, hidden)]
        blocks = wire.column_blocks(
            self.model, [s for s, _ in plain], [s.valid for s, _ in plain],
            lambda w, group: {"centred_grams": b"".join(covs[id(s)].tobytes() for s in group)})
        return monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, frames=frames, columns=blocks)

    def _requests(self, generation: int):
        # Runs on gRPC's sending thread. Idle streams still carry stats now and then.
        last = time.monotonic()
        held = None  # an item taken while merging steps, sent next
        try:
            while not self._stop.is_set() and generation == self._generation:
                if held is not None:
                    seeds, held = held, None
                else:
                    try:
                        seeds = self._queue.get(timeout=0.2)
                    except queue.Empty:
                        if time.monotonic() - last > 5.0:
                            last = time.monotonic()
                            yield monitor_pb2.FrameBatch(descriptor_names=DESCRIPTOR_NAMES, stats=self._stats_proto())
                        continue
                if generation != self._generation or self._stop.is_set():
                    # This stream died while we waited: the batch has nowhere to go.
                    self._drop_item(seeds)
                    return
                if isinstance(seeds, _Sketches):
                    last = time.monotonic()
                    yield self._snapshot_batch(seeds)
                    continue
                if isinstance(seeds, _Embeddings):
                    last = time.monotonic()
                    yield self._embedding_batch(seeds)
                    continue
                # Steps that queued up while the last message went out travel in one message: no
                # waiting (only what is already here), and under load the sidecar reads fewer, larger
                # batches (bench/bench_sidecar.py: its cost per message is a third of a 64-frame batch's).
                while len(seeds) < MERGE_SEEDS:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(more, (_Sketches, _Embeddings)):
                        held = more
                        break
                    seeds = seeds + more
                try:
                    batches = self._batches(seeds)
                except Exception:  # a bug here must cost frames, not the stream
                    self._count_dropped(len(seeds))
                    log.exception("eigenwatch: could not encode a frame batch (dropped)")
                    continue
                with self._lock:
                    self.counters.frames_sent += sum(len(b.frames) + sum(len(c.layer) for c in b.columns)
                                                     for b in batches)
                # the stats the last message carries count its own frames (/metrics' tap_frames_sent_total
                # agrees with what the sidecar ingested, not one message behind)
                batches[-1].stats.CopyFrom(self._stats_proto())
                for batch in batches:
                    last = time.monotonic()
                    yield batch
        finally:
            if held is not None:  # the stream ended before it went out
                self._drop_item(held)

    def _run(self) -> None:
        backoff = 0.2
        outage_logged = False
        while not self._stop.is_set():
            channel = None
            try:
                # A new channel per connection: TLS files are read again, so renewed certificates apply.
                channel = self.security.channel(self.target, _CHANNEL_OPTIONS)
                grpc.channel_ready_future(channel).result(timeout=1.0)
            except (grpc.FutureTimeoutError, OSError) as exc:
                if channel is not None:
                    channel.close()
                self._connected.clear()
                self._discard_queued()
                if not outage_logged:
                    why = (f"cannot read a TLS file ({exc})" if isinstance(exc, OSError) else
                           "unreachable or refusing the TLS handshake (check EIGENWATCH_TLS_*)" if self.security.tls
                           else "unreachable")
                    log.warning("eigenwatch: sidecar at %s %s; dropping frames until it is back", self.target, why)
                    outage_logged = True
                # Back off before reconnecting, but keep the queue empty meanwhile:
                # drops are counted as they happen and nothing stale piles up.
                deadline = time.monotonic() + backoff
                while not self._stop.is_set() and time.monotonic() < deadline:
                    self._discard_queued()
                    self._stop.wait(0.1)
                backoff = min(backoff * 2, 2.0)
                continue
            self._connected.set()
            if outage_logged:
                log.warning("eigenwatch: sidecar at %s is back", self.target)
                outage_logged = False
            backoff = 0.2
            self._generation += 1
            try:
                stub = monitor_pb2_grpc.MonitorStub(channel)
                stub.Ingest(self._requests(self._generation), metadata=self._metadata)
            except grpc.RpcError as exc:
                with self._lock:
                    self.counters.reconnects += 1
                # The sidecar's reason (e.g. a calibration made for other tap settings), at most
                # once a minute while it stays the same: a refused stream ends on every batch.
                why = f"{exc.code().name}: {exc.details()}" if hasattr(exc, "code") else str(exc)
                now = time.monotonic()
                if why != self._last_error or now - self._last_error_at > 60.0:
                    self._last_error, self._last_error_at = why, now
                    log.warning("eigenwatch: Ingest stream to %s ended: %s", self.target, why)
            except Exception:  # never let the exporter thread die
                log.exception("eigenwatch: exporter error; reconnecting")
            finally:
                self._generation += 1
                self._connected.clear()
                channel.close()
