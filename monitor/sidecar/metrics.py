"""Prometheus metrics of the sidecar. Every metric takes the registry it is
given, so tests build a fresh one; the taps' own counters are collected at
scrape time from the last stats each tap reported."""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# log(W) for W up to 64 stays under 4.2 nats.
ENTROPY_BUCKETS = tuple(round(0.25 * i, 2) for i in range(1, 18))
LAMBDA_BUCKETS = tuple(10.0**e for e in range(-4, 7))
SPIKE_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32)
# Risk is a probability: 0.05 steps resolve any --risk-high/--risk-low choice to
# a bucket edge near it; 0.99 separates "certain" from "high".
RISK_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.99,)
# A 1,000 × 384 Filter batch takes a few ms; 4096 rows at d = 4096 nearer a second.
FILTER_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_TAP_COUNTERS = {
    "frames_emitted": "Frames the taps produced",
    "frames_dropped": "Frames the taps dropped before gRPC (queue full, sidecar away, invalid window)",
    "frames_sent": "Frames the taps handed to gRPC",
    "hook_errors": "Exceptions caught inside tap hooks (never raised into vLLM)",
    "rows_seen": "Hidden-state rows the taps read",
    "requests_untracked": "Requests not monitored because a tap was at its request limit",
    "bad_options": "Requests whose eigenwatch extra arg was not on/off (run with the default)",
    "embeddings_sent": "Pooled embeddings the taps handed to gRPC (EIGENWATCH_EMBEDDINGS, requests that asked)",
    "embeddings_dropped": "Pooled embeddings the taps lost before gRPC (queue full, sidecar away, at the limit)",
}
# Tap values that go up and down: gauges, not counters.
_TAP_GAUGES = {
    "requests_opted_out": "Running requests that opted out of monitoring",
}


class TapStatsCollector(Collector):
    """Sums the cumulative counters each tap reports, per model."""

    def __init__(self, max_taps: int = 1024):
        self._lock = threading.Lock()
        self._taps: dict[str, dict] = {}
        self.max_taps = max_taps

    def update(self, stats) -> None:
        if not stats.tap_id:
            return
        row = {name: int(getattr(stats, name)) for name in (*_TAP_COUNTERS, *_TAP_GAUGES)}
        row["model"] = stats.model or "unknown"
        with self._lock:
            if stats.tap_id not in self._taps and len(self._taps) >= self.max_taps:
                self._taps.pop(next(iter(self._taps)))
            self._taps[stats.tap_id] = row

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {k: dict(v) for k, v in self._taps.items()}

    def collect(self):
        taps = self.snapshot()
        per_model: dict[str, dict[str, int]] = {}
        for row in taps.values():
            agg = per_model.setdefault(row["model"], dict.fromkeys((*_TAP_COUNTERS, *_TAP_GAUGES), 0))
            for name in agg:
                agg[name] += row[name]
        for names, family in ((_TAP_COUNTERS, CounterMetricFamily), (_TAP_GAUGES, GaugeMetricFamily)):
            for name, doc in names.items():
                fam = family(f"eigenwatch_tap_{name}", doc, labels=["model"])
                for model, agg in sorted(per_model.items()):
                    fam.add_metric([model], agg[name])
                yield fam
        taps_g = GaugeMetricFamily("eigenwatch_taps", "Taps that have reported stats", labels=["model"])
        counts: dict[str, int] = {}
        for row in taps.values():
            counts[row["model"]] = counts.get(row["model"], 0) + 1
        for model, n in sorted(counts.items()):
            taps_g.add_metric([model], n)
        yield taps_g


class WindowMetrics(Collector):
    """The per-window series, labelled (model, layer): eigenwatch_frames_ingested_total and the
    histograms eigenwatch_spectral_entropy_nats, eigenwatch_lambda1 and eigenwatch_spikes.

    Ingest updates them once per FrameBatch with numpy (`add`), not once per frame: a
    prometheus-client child costs a lock and a bucket search per observation, which at
    100k frames/s is a large share of the sidecar's time. Counts live in numpy arrays,
    one row per (model, layer) (LabelGuard bounds how many); scrapes copy them under a
    lock taken once per batch, and render the same series a Counter and Histograms would."""

    _HISTOGRAMS = (
        ("entropy", "eigenwatch_spectral_entropy_nats", "Spectral entropy of window spectra", ENTROPY_BUCKETS),
        ("lambda1", "eigenwatch_lambda1", "Largest eigenvalue of the centred window Gram / d", LAMBDA_BUCKETS),
        ("spikes", "eigenwatch_spikes", "Eigenvalues above the calibrated MP edge per window", SPIKE_BUCKETS),
    )

    def __init__(self):
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, int], int] = {}
        self._keys: list[tuple[str, str]] = []  # row -> (model, layer label)
        self._bounds = {name: np.asarray(b, dtype=np.float64) for name, _, _, b in self._HISTOGRAMS}
        self._ingested = np.zeros(0, dtype=np.int64)
        self._counts = {name: np.zeros((0, len(b) + 1), dtype=np.int64) for name, _, _, b in self._HISTOGRAMS}
        self._sums = {name: np.zeros(0, dtype=np.float64) for name, _, _, _ in self._HISTOGRAMS}

    def row(self, model: str, layer: int) -> int:
        """The row of a (model, layer); its series appear (at zero) from now on."""
        r = self._rows.get((model, layer))
        if r is not None:
            return r
        with self._lock:
            r = self._rows[(model, layer)] = len(self._keys)
            self._keys.append((model, str(layer)))
            if r >= len(self._ingested):  # grow by doubling: a new pair costs O(1) amortised
                size = max(8, 2 * len(self._ingested))
                self._ingested = np.resize(self._ingested, size)
                self._ingested[r:] = 0
                for name in self._counts:
                    c = np.zeros((size, self._counts[name].shape[1]), dtype=np.int64)
                    c[:r] = self._counts[name][:r]
                    self._counts[name] = c
                    s = np.zeros(size, dtype=np.float64)
                    s[:r] = self._sums[name][:r]
                    self._sums[name] = s
        return r

    def add(self, rows, entropy, lambda1, spike_rows, spikes) -> None:
        """One batch: rows [n] (from `row`) of the ingested frames, their entropy and lambda1 [n];
        spike_rows [m] and spikes [m] of the frames the spike detector counted."""
        if not len(rows):
            return
        rows = np.asarray(rows, dtype=np.intp)
        with self._lock:
            n_rows = len(self._ingested)
            self._ingested += np.bincount(rows, minlength=n_rows)
            for name, r, v in (("entropy", rows, entropy), ("lambda1", rows, lambda1),
                               ("spikes", spike_rows, spikes)):
                if not len(v):
                    continue
                r = np.asarray(r, dtype=np.intp)
                v = np.asarray(v, dtype=np.float64)
                counts = self._counts[name]
                # bucket i holds values <= bound i (Prometheus' `le`); the last one is +Inf
                b = np.searchsorted(self._bounds[name], v, side="left")
                width = counts.shape[1]
                counts += np.bincount(r * width + b, minlength=n_rows * width).reshape(n_rows, width)
                self._sums[name] += np.bincount(r, weights=v, minlength=n_rows)

    def collect(self):
        with self._lock:
            n = len(self._keys)
            keys = list(self._keys)
            ingested = self._ingested[:n].copy()
            counts = {k: v[:n].cumsum(axis=1) for k, v in self._counts.items()}
            sums = {k: v[:n].copy() for k, v in self._sums.items()}
        fam = CounterMetricFamily("eigenwatch_frames_ingested", "Frames accepted by the sidecar",
                                  labels=["model", "layer"])
        for key, value in zip(keys, ingested.tolist()):
            fam.add_metric(list(key), value)
        yield fam
        for name, metric, doc, bounds in self._HISTOGRAMS:
            les = [floatToGoString(b) for b in bounds] + ["+Inf"]
            fam = HistogramMetricFamily(metric, doc, labels=["model", "layer"])
            for key, cum, total in zip(keys, counts[name].tolist(), sums[name].tolist()):
                fam.add_metric(list(key), list(zip(les, cum)), total)
            yield fam


class BatchHistogram(Collector):
    """A histogram with one label, "model", observed a batch of values at a time (`add`):
    the same series prometheus-client's Histogram renders (_bucket, _count, _sum), for
    values that arrive in arrays (the risk model scores hundreds of steps per call, and a
    Histogram child costs a lock and a bucket search per value)."""

    def __init__(self, name: str, doc: str, buckets):
        self.name, self.doc = name, doc
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._les = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self._lock = threading.Lock()
        self._counts: dict[str, np.ndarray] = {}
        self._sums: dict[str, float] = {}

    def touch(self, model: str) -> None:
        """The model's series, at zero from now on (as Histogram.labels(model) makes them)."""
        with self._lock:
            if model not in self._counts:
                self._counts[model], self._sums[model] = np.zeros(len(self._les), dtype=np.int64), 0.0

    def add(self, model: str, values: np.ndarray) -> None:
        if not len(values):
            return
        # bucket i holds values <= bound i (Prometheus' `le`); the last one is +Inf
        b = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=len(self._les))
        total = float(np.sum(values))
        with self._lock:
            counts = self._counts.get(model)
            if counts is None:
                self._counts[model], self._sums[model] = b, total
            else:
                counts += b
                self._sums[model] += total

    def collect(self):
        with self._lock:
            rows = [(m, c.cumsum().tolist(), self._sums[m]) for m, c in self._counts.items()]
        fam = HistogramMetricFamily(self.name, self.doc, labels=["model"])
        for model, cum, total in rows:
            fam.add_metric([model], list(zip(self._les, cum)), total)
        yield fam


class Metrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        ml = ["model", "layer"]
        # eigenwatch_frames_ingested_total and the per-window histograms: updated per batch
        self.windows = WindowMetrics()
        registry.register(self.windows)
        self.frames_rejected = Counter(
            "eigenwatch_frames_rejected", "Frames refused as malformed, by offending field", ["field"], registry=registry
        )
        self.active_requests = Gauge(
            "eigenwatch_active_requests", "Monitored requests that have not finished", ["model"], registry=registry
        )
        self.requests = Counter("eigenwatch_requests", "Monitored requests seen", ["model"], registry=registry)
        self.alerts = Counter(
            "eigenwatch_alerts", "Alerts raised", ["model", "detector", "severity"], registry=registry
        )
        self.alerts_dropped = Counter(
            "eigenwatch_alerts_dropped", "Alerts not delivered to a slow WatchAlerts client", registry=registry
        )
        self.windows_unusable = Counter(
            "eigenwatch_windows_unusable",
            "Windows sent as centred Grams that gave no spectrum: nonfinite (NaN/Inf activations) or degenerate",
            ["model", "reason"], registry=registry,
        )
        self.ingest_streams = Gauge("eigenwatch_ingest_streams", "Open Ingest streams", registry=registry)
        self.alert_watchers = Gauge("eigenwatch_alert_watchers", "Open WatchAlerts streams", registry=registry)
        self.calibration_sigma2 = Gauge(
            "eigenwatch_calibration_sigma2", "Calibrated noise variance per layer (spike detector)", ml, registry=registry
        )
        self.requests_evicted = Counter(
            "eigenwatch_requests_evicted", "Request states evicted to bound memory", ["reason"], registry=registry
        )
        # EigenTrack risk (sidecar run with --risk-model; monitor/sidecar/risk.py).
        self.risk = BatchHistogram(
            "eigenwatch_risk", "EigenTrack risk of every scored step (all risk-model layers at one token count)",
            RISK_BUCKETS,
        )
        registry.register(self.risk)
        self.request_max_risk = Histogram(
            "eigenwatch_request_max_risk", "Highest EigenTrack risk of a request, observed once when it finishes",
            ["model"], buckets=RISK_BUCKETS, registry=registry,
        )
        self.risk_steps = Counter(
            "eigenwatch_risk_steps", "Steps scored by the EigenTrack risk model", ["model"], registry=registry
        )
        self.risk_skipped = Counter(
            "eigenwatch_risk_skipped_frames",
            "Frames that got no risk, by reason (other_model, descriptor_names, incomplete, out_of_order, "
            "finished, model_error)", ["model", "reason"], registry=registry,
        )
        self.risk_errors = Counter(
            "eigenwatch_risk_errors", "Risk-model calls that failed or returned non-finite values (ingest goes on)",
            ["model"], registry=registry,
        )
        self.risk_alerted_requests = Gauge(
            "eigenwatch_risk_alerted_requests",
            "Unfinished requests in the eigentrack alerted state (risk rose above the high threshold and has "
            "not fallen below the low one)", ["model"], registry=registry,
        )
        self.risk_threshold = Gauge(
            "eigenwatch_risk_threshold", "EigenTrack alert thresholds in use (bound: high raises, low re-arms)",
            ["model", "bound"], registry=registry,
        )
        # EigenShield's Filter (monitor/sidecar/shield_service.py).
        self.filter_calls = Counter(
            "eigenwatch_filter_calls", "Filter calls by result (ok, invalid_argument, failed_precondition, error)",
            ["result"], registry=registry,
        )
        self.filter_rows = Counter("eigenwatch_filter_rows", "Rows filtered by successful Filter calls",
                                   registry=registry)
        self.filter_rejected_rows = Counter(
            "eigenwatch_filter_rejected_rows", "Filtered rows whose score was above the shield's threshold",
            registry=registry,
        )
        self.filter_seconds = Histogram(
            "eigenwatch_filter_seconds", "Server time of successful Filter calls (validation, projection, reply)",
            buckets=FILTER_BUCKETS, registry=registry,
        )
        self.shield_reloads = Counter(
            "eigenwatch_shield_reloads", "Reloads of a changed --shield file: ok, or error (the old shield stays)",
            ["result"], registry=registry,
        )
        self.shield_rank = Gauge("eigenwatch_shield_rank", "Directions the loaded shield keeps (0: none loaded)",
                                 registry=registry)
        self.shield_threshold = Gauge("eigenwatch_shield_score_threshold",
                                      "Score above which Filter rejects a row (+Inf: none)", registry=registry)
        # Taps' pooled embeddings, filtered and streamed over Shield.WatchEmbeddings.
        self.embeddings = Counter(
            "eigenwatch_embeddings",
            "Pooled embeddings from taps by result (filtered, rejected: filtered and over the threshold; "
            "no_shield, dim_mismatch, invalid: not filtered)", ["result"], registry=registry,
        )
        self.embeddings_dropped = Counter(
            "eigenwatch_embeddings_dropped", "Filtered embeddings a WatchEmbeddings watcher lost by not keeping up",
            registry=registry,
        )
        self.embedding_watchers = Gauge("eigenwatch_embedding_watchers", "Open WatchEmbeddings streams",
                                        registry=registry)
        # The drift detector (monitor/sidecar/drift.py): per layer, not per request.
        self.top_direction_angle = Gauge(
            "eigenwatch_top_direction_angle_degrees",
            "Principal angle between the tap's latest top direction and the calibrated reference", ml,
            registry=registry,
        )
        self.direction_snapshots = Counter(
            "eigenwatch_direction_snapshots",
            "Direction snapshots by result (compared, no_reference, dim_mismatch, window_mismatch)",
            ["model", "layer", "result"], registry=registry,
        )
        self.direction_snapshots_rejected = Counter(
            "eigenwatch_direction_snapshots_rejected", "Malformed direction snapshots, by offending field",
            ["field"], registry=registry,
        )
        self.drift_threshold = Gauge(
            "eigenwatch_drift_threshold_degrees", "Drift angles in use (bound: alert raises, clear re-arms)",
            ["model", "layer", "bound"], registry=registry,
        )
        self.drift_alerted = Gauge("eigenwatch_drift_alerted", "1 while a layer is in the drift-alerted state", ml,
                                   registry=registry)
        # Bounds (README "Limits"): what was refused, and the memory the sidecar estimates it holds.
        self.refused = Counter(
            "eigenwatch_refused",
            "What the sidecar refused to hold or do, by reason: models / layers (label caps: frames, stats, "
            "snapshots), memory (frames of a request alone over the budget), streams / watchers (concurrency "
            "limits), watcher_stalled (a WatchAlerts client disconnected), report_size, undecodable (messages), "
            "calibration_impossible / calibration_request_cap (frames not learned from)",
            ["reason"], registry=registry,
        )
        self.state_bytes = Gauge(
            "eigenwatch_state_bytes", "Estimated bytes of request state and calibration buffers the sidecar holds",
            registry=registry,
        )
        self.memory_budget = Gauge(
            "eigenwatch_memory_budget_bytes", "The sidecar's --memory-budget-mb, in bytes", registry=registry
        )
        self.taps = TapStatsCollector()
        registry.register(self.taps)
