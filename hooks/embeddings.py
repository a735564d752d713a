"""Pooled embeddings of finished requests, for the sidecar's Shield.WatchEmbeddings.

Opt-in twice: the server sets EIGENWATCH_EMBEDDINGS and a request asks with
vllm_xargs eigenwatch_embed=on; nothing else leaves the serving process. The
sidecar filters what arrives with its --shield and streams it (the shield lives
in one place, hot-reloaded there; the tap never needs the file).

Two sources, chosen by EIGENWATCH_EMBEDDINGS:
- "output": the pooling runner's own embedding (what /v1/embeddings returns for
  MiniLM), read from the step's ModelRunnerOutput after vLLM made it. On a GPU
  vLLM copies it to the host on its own stream; we keep its event and the host
  tensor, and the exporter thread waits on the event, never the engine thread.
- a tapped layer's index: the mean of the request's rows at that layer (prompt
  and generated tokens the engine computed), summed per step on the model's
  device in float32 and divided once at the end: the same Σx/n as the offline
  token sums (hooks/capture.py) give `eigenwatch shield fit`.

Only requests that asked hold state, so ordinary traffic pays a set lookup per
new request and nothing per token. Not thread-safe: the engine thread only;
`vector()` runs on the exporter thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

OUTPUT_LAYER = -1  # PooledEmbedding.layer of the pooling runner's output


@dataclass(slots=True)
class Pooled:
    """One finished request's embedding, possibly still in flight to the host."""

    request_id: str
    engine_request_id: str
    layer: int  # OUTPUT_LAYER or the pooled decoder layer
    value: torch.Tensor  # [d]
    tokens: int  # rows pooled (0 for the pooling runner's output)
    ready: object = None  # a CUDA event to wait on before reading `value`, or None

    def vector(self) -> np.ndarray:
        """[d] float32 on the host (waits for an in-flight copy: exporter thread only)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.value.detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()


class EmbeddingTap:
    """Which requests asked for their embedding, their running sums (layer
    source) and the finished embeddings waiting for the exporter."""

    def __init__(self, source: str, max_requests: int):
        self.layer = None if source == "output" else int(source)
        self.max_requests = max_requests
        self.wanted: dict[str, str] = {}  # engine id -> external id
        self.sums: dict[str, list] = {}  # engine id -> [Σx [d] float32 on the device, rows]
        self.done: list[Pooled] = []
        self.refused = 0  # requests that asked past max_requests

    def want(self, engine_id: str, external_id: str) -> None:
        """The request asked for its embedding (called once, when it is first seen)."""
        if engine_id in self.wanted:
            return
        if len(self.wanted) >= self.max_requests:
            self.refused += 1
            return
        self.wanted[engine_id] = external_id

    # ---- layer source ----------------------------------------------------------------
    def add_step(self, rows: dict[int, torch.Tensor], items: list[tuple[str, int, int]]) -> None:
        """The step's rows {layer: [N, d]}; items (engine id, lo, hi) of tracked requests."""
        if self.layer is None or not self.wanted:
            return
        stream = rows.get(self.layer)
        if stream is None:
            return
        for rid, lo, hi in items:
            if rid not in self.wanted or hi <= lo:
                continue
            part = stream[lo:hi].sum(dim=0, dtype=torch.float32)  # [d], stays on the device
            acc = self.sums.get(rid)
            if acc is None:
                self.sums[rid] = [part, hi - lo]
            else:
                acc[0] += part
                acc[1] += hi - lo

    def finish(self, engine_id: str) -> None:
        """The request ended: its mean row becomes its embedding (layer source)."""
        external = self.wanted.pop(engine_id, None)
        acc = self.sums.pop(engine_id, None)
        if external is None or acc is None or self.layer is None:
            return
        self.done.append(Pooled(external, engine_id, self.layer, acc[0] / acc[1], acc[1]))

    def drop(self, engine_id: str) -> None:
        """Preempted: it is recomputed from scratch, so its sum starts over."""
        self.sums.pop(engine_id, None)

    def forget(self, engine_id: str) -> None:
        self.wanted.pop(engine_id, None)
        self.sums.pop(engine_id, None)

    # ---- output source ---------------------------------------------------------------
    def on_output(self, output) -> None:
        """After a step: the pooler outputs of finished requests that asked."""
        if self.layer is not None or not self.wanted or output is None:
            return
        ready = getattr(output, "async_copy_ready_event", None)  # vLLM's GPU pooling output
        inner = getattr(output, "_model_runner_output", output) if ready is not None else output
        pooled = getattr(inner, "pooler_output", None)
        index = getattr(inner, "req_id_to_index", None)
        if not pooled or not index:
            return
        for rid in [r for r in self.wanted if r in index]:
            value = pooled[index[rid]]
            if value is None:  # not finished this step (a chunked prompt)
                continue
            self.done.append(Pooled(self.wanted.pop(rid), rid, OUTPUT_LAYER, value, 0, ready))

    def take(self) -> list[Pooled]:
        out, self.done = self.done, []
        return out
