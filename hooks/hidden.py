"""Live hidden-state statistics: what the combined score's hidden-state voters
need, computed in the tap from the rows it already captures, against the
Gaussians of the calibration file (EIGENWATCH_CALIBRATION=CALIB.json, written
by `eigenwatch calibrate`). A request's final frame at each tapped layer
carries a few numbers (HiddenStats in monitor.proto), never the states:

- token_sqdist: mean over its rows of d²(x_t)/p against the layer's token
  Gaussian (token_mahalanobis): every row is scored on the device as it passes,
  O(p²) per row (kernels/hidden_stats.RowSqdist), and summed per request;
- pooled_sqdist: d²(Σx/n)/p against the layer's pooled-state Gaussian
  (hidden_mahalanobis), from the request's running Σx [p] per layer;
- llmcheck: LLM-Check's hidden score at the calibration's middle layer, from the
  request's first LLMCHECK_ROWS (256) rows there, kept as they pass
  (kernels/hidden_stats.llmcheck_rows; the offline capture keeps the same rows);
- probe_logit: the token_probe detector's mean token logit at its layer,
  w·(Σx/n) + b from the same running Σx (kernels/hidden_stats.LinearProbe).

Per step (inside the post-step work, batched over requests and layers): one
[L, N, p] × [L, p, p] product for the distances, the rows summed per request
in float32 (centred on the calibration's mean, so the sums keep their digits)
and added into the requests' float64 slots, one index_add of the distances,
and one copy of the middle layer's rows that are among their request's first
256 into the requests' heads. The finishing math (the pooled distances and
probe logits of all the frames the exporter is sending, one product each; a
Cholesky per request for LLM-Check) runs on the exporter's thread
(`part_values`), never in the forward. A step's last frame per request and
layer carries the running values of all but LLM-Check (the rows so far: two
p-wide copies), for the sidecar's running combined value during generation.

Memory per tracked request: L·p + L float64 sums, plus 256·p float32 at the
middle layer (256 KB at p = 256, 4 MB at p = 4096); slots grow with the
requests in flight, and `max_requests` bounds them.
Equal to `eigenwatch score`'s values up to float64 rounding: the offline
detectors compute the same numbers from the text's token sums (features.py).
"""

from __future__ import annotations

import json
import logging
from itertools import repeat

import numpy as np
import torch

from eigenwatch.kernels.hidden_stats import (LLMCHECK_ROWS, LinearProbe, LowRankGaussian, RowSqdist,
                                             calibration_id, llmcheck_rows, middle_layer)
from eigenwatch.kernels.window_bank import Slots, host_index

log = logging.getLogger("eigenwatch.hidden")

VOTERS = ("token_mahalanobis", "hidden_mahalanobis", "llmcheck_hidden", "token_probe")


class HiddenCalibration:
    """What the tap reads from a calibration file: per tapped layer the token and
    pooled Gaussians (either may be absent), the LLM-Check layer, the token probe
    (or None), the file's id."""

    def __init__(self, cal_id: str, layers: tuple[int, ...], token: dict, pooled: dict, llm_layer: int | None,
                 path: str, probe: LinearProbe | None = None):
        self.id, self.layers, self.token, self.pooled, self.llm_layer, self.path = (
            cal_id, layers, token, pooled, llm_layer, path)
        self.probe = probe


def load_hidden_calibration(path: str, tap_layers: tuple[int, ...], window: int, stride: int,
                            source: str = "EIGENWATCH_CALIBRATION") -> HiddenCalibration | None:
    """The hidden-state part of CALIB.json for a tap with these settings. None when
    the file has no offline detectors that read hidden states (nothing to compute);
    ValueError naming the file and field when it cannot be used."""
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise ValueError(f"{source}: cannot read {path!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{source}: {path!r} is not JSON ({exc}); write it with `eigenwatch calibrate`") from None
    off = doc.get("offline") if isinstance(doc, dict) else None
    if not isinstance(off, dict) or not isinstance(off.get("detectors"), dict):
        return None  # a sidecar-only calibration (spike σ² per layer): no hidden-state voters
    where = f"{source}: {path}: offline"
    layers = off.get("layers")
    if not isinstance(layers, list) or sorted(layers) != list(tap_layers):
        raise ValueError(f"{where}.layers is {layers!r} but the tap watches layers {list(tap_layers)}: set "
                         f"EIGENWATCH_LAYERS={','.join(str(l) for l in layers or [])} or recalibrate on these layers")
    for key, have in (("window", window), ("stride", stride)):
        if off.get(key) != have:
            raise ValueError(f"{where}.{key} is {off.get(key)!r} but the tap runs with EIGENWATCH_{key.upper()}="
                             f"{have}: the combined score would not match the calibration; set it to {off.get(key)!r}")
    dets = off["detectors"]
    try:
        token = {int(l): LowRankGaussian.from_state(g)
                 for l, g in dets.get("token_mahalanobis", {}).get("layers", {}).items()}
        pooled = {int(l): LowRankGaussian.from_state(g)
                  for l, g in dets.get("hidden_mahalanobis", {}).get("layers", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{where}.detectors: a damaged Gaussian ({exc}); recalibrate with `eigenwatch calibrate`") \
            from None
    llm = middle_layer(tap_layers) if "llmcheck_hidden" in dets else None
    probe = None
    if "token_probe" in dets:
        probe = LinearProbe.from_state(dets["token_probe"], f"{where}.detectors.token_probe")
        if probe.layer not in tap_layers:
            raise ValueError(f"{where}.detectors.token_probe.layer is {probe.layer}, which the tap does not watch "
                             f"(layers {list(tap_layers)}); recalibrate")
    if not token and not pooled and llm is None and probe is None:
        return None
    for name, g in list(token.items()) + list(pooled.items()):
        if name not in tap_layers:
            raise ValueError(f"{where}.detectors: a Gaussian for layer {name}, which the tap does not watch")
    return HiddenCalibration(calibration_id(dets), tuple(tap_layers), token, pooled, llm, path, probe)


class HiddenPart:
    """One request's sums at one layer, handed to its final frame seed;
    `part_values` (the exporter's thread) turns them into (rows, token_sqdist,
    pooled_sqdist, llmcheck or None, calibration id, probe_logit or None).
    `total` is Σ(x − center), `center` [p] float64 the tap's centre for the layer."""

    __slots__ = ("cal", "layer", "rows", "sq", "total", "center", "mid")

    def __init__(self, cal: HiddenCalibration, layer: int, rows: int, sq, total, center, mid):
        self.cal, self.layer, self.rows, self.sq, self.total, self.center, self.mid = (
            cal, layer, rows, sq, total, center, mid)

    def values(self) -> tuple:
        return part_values([self])[0]


def part_values(parts: list[HiddenPart]) -> list[tuple]:
    """`HiddenPart.values` of many parts: per calibration and layer, one copy of their
    sums to the host, one [R, p] product for the pooled distances and one for the
    probe's logits. One call per part repeated those per frame: in the MiniLM worker
    (512 texts × 3 layers per call) the finishing math took as many profiler samples
    as the per-step statistics, on the cores the forward runs on. LLM-Check's
    Cholesky stays per request (batched with padding it was slower)."""
    out: list = [None] * len(parts)
    groups: dict = {}
    for i, part in enumerate(parts):
        groups.setdefault((id(part.cal), part.layer), []).append(i)
    for idx in groups.values():
        cal, layer = parts[idx[0]].cal, parts[idx[0]].layer
        n = np.array([parts[i].rows for i in idx], dtype=np.float64)  # [R]
        token = np.full(len(idx), np.nan)
        if layer in cal.token:
            token = torch.stack([parts[i].sq for i in idx]).cpu().numpy() / n
        g, probe = cal.pooled.get(layer), cal.probe
        if probe is not None and probe.layer != layer:
            probe = None
        pooled, logit = np.full(len(idx), np.nan), [None] * len(idx)
        if g is not None or probe is not None:
            mean = torch.stack([parts[i].total for i in idx]).cpu().numpy() / n[:, None]  # [R, p] of x − center
            mean += parts[idx[0]].center
            if g is not None:
                pooled = g.sqdist(mean) / g.p
            if probe is not None:
                logit = (mean @ probe.w + probe.b).tolist()
        for j, i in enumerate(idx):
            mid = parts[i].mid  # the request's first LLMCHECK_ROWS rows at LLM-Check's layer
            llm = llmcheck_rows(mid.cpu().numpy()) if mid is not None else None
            out[i] = (parts[i].rows, float(token[j]), float(pooled[j]), llm, cal.id, logit[j])
    return out


class HiddenStatsTap:
    """Per-request running sums for `HiddenCalibration`'s statistics (see the module docstring)."""

    def __init__(self, cal: HiddenCalibration, max_requests: int):
        self.cal = cal
        self.layers = cal.layers
        self.li = {l: i for i, l in enumerate(self.layers)}
        self.slots = Slots(max_requests)
        self.slot_of: dict[str, int] = {}
        self.n = np.zeros(0, dtype=np.int64)  # [S] rows per slot (every tapped layer sees the same rows)
        self.sq = None  # [L, S] float64: Σ_t d²(x_t)/p per layer (0 where a layer has no token Gaussian)
        self.total = None  # [L, S, p] float64: Σ(x − center) per layer
        self.head = None  # [S, LLMCHECK_ROWS, p] float32: each request's first rows at LLM-Check's layer
        # One RowSqdist for the layers with a token Gaussian, built here (on the CPU, at load)
        # and moved to the rows' device with the first rows; _gi: their places in self.layers
        # (a tensor there; None when every layer has one).
        have = [i for i, l in enumerate(self.layers) if l in cal.token]
        widths = {cal.token[self.layers[i]].p for i in have}
        if len(widths) > 1:
            raise ValueError(f"EIGENWATCH_CALIBRATION: token Gaussians of widths {sorted(widths)}; "
                             "recalibrate on one model")
        self._g = RowSqdist([cal.token[self.layers[i]] for i in have], "cpu") if have else None
        self._have = have
        self._gi = None
        # A row's sum goes in as x − center, with the layer's centre the token Gaussian's
        # mean rounded to float32 (else the pooled one's; else 0): each step's rows are
        # summed per request in float32 (a float64 scatter of every row cost as much as
        # the distances), and centred, their float32 sum keeps ~7 digits of what the
        # pooled distance and the probe read, Σx/n − m, also where a dimension's mean is
        # large against its spread. center_np [L, p] float64 (the same numbers), _center
        # [L, p] float32 on the rows' device; both set with the first rows.
        self.center_np = None
        self._center = None
        self.mid_i = self.li.get(cal.llm_layer)
        self.untracked = 0
        self.refused: set[str] = set()  # ids refused at the limit: never started later with rows missing

    def _ensure(self, slot: int, like: torch.Tensor) -> None:
        if self.total is None:
            L, p = len(self.layers), like.shape[-1]
            self.sq = torch.zeros((L, 0), dtype=torch.float64, device=like.device)
            self.total = torch.zeros((L, 0, p), dtype=torch.float64, device=like.device)
            self.head = torch.zeros((0, LLMCHECK_ROWS if self.mid_i is not None else 0, p), dtype=torch.float32,
                                    device=like.device)
            center = np.zeros((L, p), dtype=np.float32)
            for i, l in enumerate(self.layers):
                for kind, g in (("token", self.cal.token.get(l)), ("pooled", self.cal.pooled.get(l))):
                    if g is not None and g.p != p:
                        raise ValueError(f"EIGENWATCH_CALIBRATION: layer {l}'s {kind} Gaussian is {g.p} "
                                         f"wide, the model's rows are {p}: recalibrate on this model")
                g = self.cal.token.get(l) or self.cal.pooled.get(l)
                if g is not None:
                    center[i] = g.mean
            self.center_np = center.astype(np.float64)
            self._center = torch.from_numpy(center).to(like.device)  # [L, p]
            if self._g is not None:
                self._g.to(like.device)
                self._gi = None if len(self._have) == L else torch.tensor(self._have, device=like.device)
            probe = self.cal.probe
            if probe is not None and len(probe.w) != p:
                raise ValueError(f"EIGENWATCH_CALIBRATION: the token probe is {len(probe.w)} wide, the model's rows "
                                 f"are {p}: recalibrate on this model")
        if slot >= self.total.shape[1]:
            grow = max(slot + 1, 2 * self.total.shape[1], 8)
            k = grow - self.total.shape[1]
            L, p = self.total.shape[0], self.total.shape[2]
            self.sq = torch.cat([self.sq, self.sq.new_zeros((L, k))], dim=1)
            self.total = torch.cat([self.total, self.total.new_zeros((L, k, p))], dim=1)
            self.head = torch.cat([self.head, self.head.new_zeros((k,) + self.head.shape[1:])])
            self.n = np.concatenate([self.n, np.zeros(k, dtype=np.int64)])

    def add_step(self, rows: dict[int, torch.Tensor], items: list[tuple[str, int, int]]) -> None:
        """rows {layer: [N, p]} of one step, items (engine id, lo, hi) of the tracked requests."""
        if not items or not rows:
            return
        if any(l not in rows for l in self.layers):  # every tapped layer gives rows every step, or none
            raise RuntimeError(f"hidden-state statistics need rows of every tapped layer {list(self.layers)} "
                               f"in each step, got layers {sorted(rows)}")
        n = len(items)
        ids, lo, hi = zip(*items)
        lo = np.fromiter(lo, np.int64, n)
        hi = np.fromiter(hi, np.int64, n)
        slot = np.fromiter(map(self.slot_of.get, ids, repeat(-1)), np.int64, n)
        like = next(iter(rows.values()))
        for i in np.flatnonzero(slot < 0).tolist():  # new requests only
            if ids[i] in self.refused:
                continue
            s = self.slots.alloc()
            if s is None:
                self.untracked += 1
                self.refused.add(ids[i])
                continue
            self._ensure(s, like)
            self.slot_of[ids[i]] = s
            slot[i] = s
        keep = slot >= 0
        if not keep.any():
            return
        lo, hi, slot = lo[keep], hi[keep], slot[keep]
        lens = hi - lo
        n_req, M = len(slot), int(lens.sum())
        # Stream positions of the kept rows, built without a Python loop; a plain
        # slice when they are one run (every request tracked, the usual case).
        starts = np.cumsum(lens) - lens
        pos = np.repeat(lo - starts, lens) + np.arange(M)
        dev = like.device
        run = M > 0 and bool((np.diff(pos) == 1).all())  # one slice of the step's rows
        pos_t = None if run else host_index(pos, dev)
        row_req = host_index(np.repeat(np.arange(n_req), lens), dev)  # [M]: each row's place in items
        slot_t = host_index(slot, dev)
        self.n[slot] += lens
        # All layers at once: a few ops per step, not a few per layer (a decode step is
        # ~5 ms on the tiny Llama, and each op costs µs). xc = x − center, written once
        # ([L, M, p] float32; a float32 copy of the rows is exact); each request's rows of
        # this step summed in float32 ([L, R, p]), then added into its float64 sums.
        L, p = len(self.layers), like.shape[-1]
        xc = torch.empty((L, M, p), dtype=torch.float32, device=dev)
        for i, l in enumerate(self.layers):
            src = rows[l][int(pos[0]):int(pos[0]) + M] if run else rows[l].index_select(0, pos_t)
            torch.sub(src, self._center[i], out=xc[i])
        if M == n_req:  # one row each (decode): the rows are their sums
            self.total.index_add_(1, slot_t, xc.double())
        else:
            step = xc.new_zeros((L, n_req, p))
            step.index_add_(1, row_req, xc)
            self.total.index_add_(1, slot_t, step.double())
        if self.mid_i is not None:
            # Each row's place among its request's rows: those before LLMCHECK_ROWS go to
            # the request's head, all of this step's in one copy (float32, as captured).
            at = np.repeat(self.n[slot] - lens, lens) + (np.arange(M) - np.repeat(starts, lens))
            keep = at < LLMCHECK_ROWS
            if keep.any():
                pick = np.flatnonzero(keep)
                src = rows[self.layers[self.mid_i]].index_select(0, host_index(pos[pick], dev))
                pick = host_index(pick, dev)
                self.head.index_put_((slot_t.index_select(0, row_req.index_select(0, pick)),
                                      host_index(at[keep], dev)), src.float())
        if self._g is not None:
            # The token Gaussians' means rounded to float32 are the centres of their layers,
            # so the distances start from xc (overwritten: the sums are taken).
            row_slot = slot_t.index_select(0, row_req)
            if self._gi is None:
                self.sq.index_add_(1, row_slot, self._g(xc, centred=True))  # [L, M]
            else:
                d2 = self._g(xc.index_select(0, self._gi), centred=True)  # [G, M]
                for j, i in enumerate(self._gi.tolist()):
                    self.sq[i].index_add_(0, row_slot, d2[j])

    def finish(self, engine_id: str) -> dict[int, HiddenPart] | None:
        """The request ended: its parts per layer (None if it was not tracked); its slot is freed."""
        return self.finish_many([engine_id]).get(engine_id)

    def finish_many(self, engine_ids) -> dict[str, dict[int, HiddenPart]]:
        """Requests that ended: their parts per layer (absent: not tracked, or no rows); their
        slots are freed. The sums of all of them in one gather and one clear, not two copies
        and two clears per request and layer (a MiniLM step ends dozens of requests)."""
        ids, slots = [], []
        for rid in engine_ids:
            s = self.slot_of.pop(rid, None)
            if s is None:
                self.refused.discard(rid)
            else:
                ids.append(rid)
                slots.append(s)
        if not slots:
            return {}
        at = np.array(slots, dtype=np.int64)
        n = self.n[at].copy()
        idx = host_index(at, self.total.device)
        sq, total = self.sq.index_select(1, idx), self.total.index_select(1, idx)  # [L, R], [L, R, p]: copies
        out = {}
        for j, (rid, s) in enumerate(zip(ids, slots)):
            if n[j] == 0:
                continue
            mid = self.head[s, :min(int(n[j]), LLMCHECK_ROWS)].clone() if self.mid_i is not None else None
            out[rid] = {l: HiddenPart(self.cal, l, int(n[j]), sq[i, j], total[i, j], self.center_np[i],
                                      mid if l == self.cal.llm_layer else None)
                        for i, l in enumerate(self.layers)}
        self.n[at] = 0
        self.sq.index_fill_(1, idx, 0.0)
        self.total.index_fill_(1, idx, 0.0)
        for s in slots:
            self.slots.release(s)
        return out

    def drop(self, engine_id: str) -> None:
        """Forget a request (preempted: it is recomputed from scratch)."""
        s = self.slot_of.pop(engine_id, None)
        self.refused.discard(engine_id)
        if s is not None:
            self._release(s)

    def _release(self, s: int) -> None:
        self.n[s] = 0
        self.sq[:, s].zero_()
        self.total[:, s].zero_()
        self.slots.release(s)

    def attach_running(self, seeds) -> None:
        """This step's (non-final) frame seeds get the running statistics of their request:
        the rows so far, without LLM-Check (a Cholesky per frame is not worth a running value).
        Only the step's last seed per request and layer: the sums are the step's, so its
        earlier seeds would carry the same numbers, which the sidecar would overwrite (a
        MiniLM text's prompt gives two or three frames per layer in one step)."""
        seen = set()
        for seed in reversed(seeds):
            key = (seed.engine_request_id, seed.layer)
            s = self.slot_of.get(seed.engine_request_id)
            i = self.li.get(seed.layer)
            if s is None or i is None or seed.final or key in seen:
                continue
            seen.add(key)
            seed.hidden = HiddenPart(self.cal, seed.layer, int(self.n[s]), self.sq[i, s].clone(),
                                     self.total[i, s].clone(), self.center_np[i], None)

    def before_step(self, finished, pending: list) -> int:
        """Finished requests hand their parts to their final frame seeds in `pending`;
        returns how many requests had no final frame to carry them (fewer than 2 rows)."""
        lost = 0
        done = self.finish_many(finished)
        finals = {(sd.engine_request_id, sd.layer): sd for sd in pending if sd.final} if done else None
        for rid, parts in done.items():
            got = False
            for l, part in parts.items():
                seed = finals.get((rid, l))
                if seed is not None:
                    seed.hidden = part
                    got = True
            lost += not got
        return lost
