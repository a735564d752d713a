"""Per-request lexical signatures (Sparton, issue 14): the top-k terms of

    w[v] = max over the request's rows t at one layer of log1p(relu(norm(h_t) · W[v] + b[v]))

through the model's own unembedding W (`lm_head`; for an encoder such as
MiniLM, its tied word-embedding matrix), computed by the fused sparse head
(kernels/sparton.py), never as [tokens × vocab] logits.

The vLLM tap (hooks/_vllm_worker.py) feeds `SignatureBank` the rows it already
captured for its tapped layers, once per step, after the forward: a prefill
chunk goes through `sparse_head` in one call; decode rows of all requests go
in one batched call. Per request only the top-k (term id, weight) of the
running max is kept, and that is exact: a term in the top k of max(a, b) is in
the top k of a or of b with the same value (the max only grows), so merging
the kept top k with a step's values and taking the top k again loses nothing
(up to ties at the k-th weight). Memory: k ids + k weights per request
(`max_requests` × k in all). The signature leaves in the request's final frame
of the signature layer (Frame.signature, proto/eigenwatch/v1/monitor.proto);
the sidecar matches it against known-bad signatures (monitor/sidecar/signatures.py).

Decoders' rows are residual streams: like the logit lens, the model's final
norm (RMSNorm or LayerNorm) is applied to each row first. Encoder rows (BERT
layers end in a LayerNorm) go in as they are.

Off unless EIGENWATCH_SIGNATURE_LAYER names one of the tapped layers
(EIGENWATCH_SIGNATURE_TOPK: k). Cost when on: a decode step multiplies its
rows by the [V, d] head, as large as the model's own lm_head product. Nothing
here raises into vLLM: failures are counted in the tap's hook errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch

from eigenwatch.kernels.sparton import sparse_head
from eigenwatch.kernels.window_bank import Slots, host_index

log = logging.getLogger("eigenwatch.tap")

DEFAULT_TOPK = 64
# The decode batch is cut so its [rows, V] fp32 weights stay under this many bytes.
STEP_BYTES = 64 << 20
NORM_KINDS = ("none", "rms", "layer")


@dataclass(frozen=True)
class Head:
    """The unembedding a signature is read through, as views of the model's own parameters."""

    weight: torch.Tensor  # [V, D]
    bias: torch.Tensor | None  # [V]
    source: str  # the module it came from, e.g. "lm_head" or "embeddings.word_embeddings"
    norm: str = "none"  # the final norm applied to rows first: none | rms | layer
    norm_weight: torch.Tensor | None = None  # [D]
    norm_bias: torch.Tensor | None = None  # [D] (layer norm)
    norm_eps: float = 1e-6

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def normalise(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [..., D] -> the head's input in its dtype (the final norm in fp32 first)."""
        x = rows.float()
        if self.norm == "rms":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight.float()
        elif self.norm == "layer":
            x = torch.nn.functional.layer_norm(
                x, (x.shape[-1],), self.norm_weight.float(),
                None if self.norm_bias is None else self.norm_bias.float(), self.norm_eps)
        return x.to(self.weight.dtype)

    def encode(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, D], mask [B, S] -> w [B, V] float32 (kernels/sparton.py)."""
        return sparse_head(self.normalise(hidden), mask, self.weight, self.bias, out_dtype=torch.float32)

    def export(self) -> dict:
        """The head as float32 numpy arrays (the sidecar's --sparse-head file, monitor/sidecar/signatures.py)."""
        out = {"weight": self.weight.detach().float().cpu().numpy(), "norm": self.norm,
               "norm_eps": float(self.norm_eps), "source": self.source}
        for name in ("bias", "norm_weight", "norm_bias"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t.detach().float().cpu().numpy()
        return out


def _final_norm(model: torch.nn.Module) -> tuple[str, torch.Tensor | None, torch.Tensor | None, float]:
    """A decoder's final norm: (kind, weight, bias, eps), kind 'none' when there is none to find."""
    for owner in (getattr(model, "model", None), getattr(model, "transformer", None), model):
        if owner is None:
            continue
        for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
            mod = getattr(owner, name, None)
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or w.ndim != 1:
                continue
            eps = getattr(mod, "variance_epsilon", None) or getattr(mod, "eps", None) or 1e-6
            if "rms" in type(mod).__name__.lower():
                return "rms", w, None, float(eps)
            if isinstance(mod, torch.nn.LayerNorm) or "layernorm" in type(mod).__name__.lower():
                return "layer", w, getattr(mod, "bias", None), float(eps)
    return "none", None, None, 1e-6


def find_head(model: torch.nn.Module, vocab_size: int | None = None) -> Head:
    """The model's unembedding: `lm_head` (decoders, with their final norm), else the
    word-embedding matrix (encoders: BERT's MLM decoder is tied to it). Works on
    transformers' and vLLM's module trees. Padded vocabulary rows (vLLM pads to a
    multiple of 64) are cut at `vocab_size` (or the module's own count).
    Raises ValueError saying what is missing."""
    head = getattr(model, "lm_head", None)
    source = "lm_head"
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        head, source = None, ""
        for name, mod in model.named_modules():
            if name.endswith(("word_embeddings", "embed_tokens", "wte")) and isinstance(
                    getattr(mod, "weight", None), torch.Tensor):
                head, source = mod, name
                break
    if head is None:
        raise ValueError(f"{type(model).__name__} has neither an lm_head nor a word-embedding matrix "
                         "(…word_embeddings / embed_tokens / wte) to read signatures through")
    if int(getattr(head, "tp_size", 1) or 1) > 1:
        raise ValueError("lexical signatures need the whole unembedding on one rank: run with "
                         "tensor_parallel_size 1, or leave EIGENWATCH_SIGNATURE_LAYER unset")
    w = head.weight
    if w.ndim != 2:
        raise ValueError(f"{source}.weight: expected a [vocab, hidden] matrix, got shape {tuple(w.shape)}")
    v = int(getattr(head, "org_vocab_size", 0) or w.shape[0])
    if vocab_size:
        v = min(v, int(vocab_size))
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        w = w.float()  # e.g. fp64 heads; quantised heads have no plain weight to read
    bias = getattr(head, "bias", None) if source == "lm_head" else None
    bias = bias[:v].to(w.dtype) if isinstance(bias, torch.Tensor) else None
    kind, nw, nb, eps = _final_norm(model) if source == "lm_head" else ("none", None, None, 1e-6)
    return Head(w[:v].detach(), bias, source, kind, nw, nb, eps)


def layer_rows(model: torch.nn.Module, layer: int, input_ids: list[int]) -> torch.Tensor:
    """A transformers model's rows [T, D] fp32 at block `layer` for one text, read
    the way the taps read them (hooks/layers.py): the block's residual stream."""
    from .layers import find_decoder_layers, residual_stream

    _, stack = find_decoder_layers(model)
    got: list[torch.Tensor] = []

    def hook(module, args, output):
        h = residual_stream(output)
        got.append((h[0] if h.ndim == 3 else h).to(torch.float32, copy=True))

    handle = stack[layer].register_forward_hook(hook)
    try:
        device = next(model.parameters()).device
        ids = torch.tensor([list(input_ids)], device=device)
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        handle.remove()
    return got[0]


def topk_terms(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [B, V] -> (ids [B, k'] int64, weights [B, k'] float32), k' = min(k, V), descending;
    terms of weight 0 (no positive logit) are left to the reader to drop."""
    vals, ids = torch.topk(w, min(k, w.shape[1]), dim=1)
    return ids, vals


class SignatureBank:
    """The running top-k signature of every tracked request at one layer. Engine thread only."""

    def __init__(self, head: Head, layer: int, topk: int, max_requests: int, failed=None):
        if topk < 1:
            raise ValueError(f"EIGENWATCH_SIGNATURE_TOPK: expected an integer >= 1, got {topk}")
        self.head, self.layer = head, layer
        self.k = min(topk, head.vocab_size)
        self.slots = Slots(max_requests)
        self.slot_of: dict[str, int] = {}
        dev = head.weight.device
        # Kept terms per slot.
        self.ids = torch.zeros((max_requests, self.k), dtype=torch.int64, device=dev)
        self.vals = torch.zeros((max_requests, self.k), dtype=torch.float32, device=dev)
        self.failed = failed  # callback(key) of the tap: count and log once
        self.sent = self.lost = self.untracked = 0

    # ---- per step (after the forward) -----------------------------------------------
    def add_step(self, rows: dict[int, torch.Tensor], items: list[tuple[str, int, int]]) -> None:
        """This step's rows {layer: [N, d]} and items (engine id, lo, hi) of tracked requests."""
        try:
            stream = rows.get(self.layer)
            if stream is None or not items:
                return
            # The step's bookkeeping as arrays (as hooks/windows.py does): Python work only for new requests.
            n = len(items)
            ids, lo, hi = zip(*items)
            lo, hi = np.fromiter(lo, np.int64, n), np.fromiter(hi, np.int64, n)
            fresh = set(ids).difference(self.slot_of)
            if fresh:
                self._begin(fresh)
            slot = np.fromiter(map(self.slot_of.get, ids, repeat(-1)), np.int64, n)  # -1: over the limit
            single = np.flatnonzero((hi - lo == 1) & (slot >= 0))
            step = max(1, STEP_BYTES // (4 * self.head.vocab_size))
            for a in range(0, single.size, step):  # all decode rows in one call (per STEP_BYTES)
                part = single[a:a + step]
                h = stream.index_select(0, host_index(lo[part], stream.device))[:, None]  # [n, 1, d]
                self._merge(slot[part], h)
            for i in np.flatnonzero((hi - lo > 1) & (slot >= 0)).tolist():
                self._merge(slot[i:i + 1], stream[lo[i]:hi[i]][None])  # a prefill chunk: one fused call [1, T, d]
        except Exception:
            self._fail("rows")

    def _begin(self, engine_ids) -> None:
        new = []
        for rid in engine_ids:
            s = self.slots.alloc()
            if s is None:  # only while the tap tracks more requests than max_requests (never, as configured)
                self.untracked += 1
                continue
            self.slot_of[rid] = s
            new.append(s)
        if new:  # a fresh slot holds (id 0, weight 0): w >= 0, so merging it changes nothing
            idx = host_index(new, self.ids.device)
            self.ids[idx] = 0
            self.vals[idx] = 0.0

    def _merge(self, slots: np.ndarray, hidden: torch.Tensor) -> None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        w = self.head.encode(hidden, mask)  # [n, V] float32
        idx = host_index(slots, w.device)
        w.scatter_reduce_(1, self.ids[idx], self.vals[idx], reduce="amax")  # the running max, at the kept terms
        ids, vals = topk_terms(w, self.k)
        self.ids[idx] = ids
        self.vals[idx] = vals

    # ---- request ends (before the next step) ----------------------------------------
    def before_step(self, scheduler_output, pending: list) -> None:
        """Preempted requests are forgotten (recomputed later); finished ones hand their
        signature to their final frame seed of the signature layer in `pending`."""
        try:
            for rid in getattr(scheduler_output, "preempted_req_ids", None) or ():
                self.drop(rid)
            done = [rid for rid in scheduler_output.finished_req_ids if rid in self.slot_of]
            if not done:
                return
            finals = {s.engine_request_id: s for s in pending if s.final and s.layer == self.layer}
            for rid in done:
                slot = self.slot_of.pop(rid)
                seed = finals.get(rid)
                if seed is not None:  # copies: the slot is reused before the exporter reads them
                    seed.signature = (self.ids[slot].clone(), self.vals[slot].clone(), self.head.vocab_size)
                    self.sent += 1
                else:  # fewer than 2 rows: no final frame to carry it
                    self.lost += 1
                self.slots.release(slot)
        except Exception:
            self._fail("finish")

    def drop(self, engine_id: str) -> None:
        slot = self.slot_of.pop(engine_id, None)
        if slot is not None:
            self.slots.release(slot)

    def _fail(self, key: str) -> None:
        if self.failed is not None:
            self.failed(f"signature-{key}")
        else:
            log.exception("eigenwatch: lexical signature %s failed", key)

    def stats(self) -> dict:
        return {"layer": self.layer, "topk": self.k, "vocab_size": self.head.vocab_size, "head": self.head.source,
                "norm": self.head.norm, "tracked": len(self.slot_of), "sent": self.sent, "lost": self.lost,
                "untracked": self.untracked}


def signature_bank(cfg, model: torch.nn.Module, layers: tuple[int, ...], num_layers: int, model_config,
                   tap) -> SignatureBank | None:
    """The vLLM tap's bank from its TapConfig, None when signatures are off. `tap`
    counts failures (hook_errors, logged once). Raises ValueError for a signature
    layer that is not tapped."""
    if cfg.signature_layer is None:
        return None
    want = cfg.signature_layer + num_layers if cfg.signature_layer < 0 else cfg.signature_layer
    if want not in layers:
        raise ValueError(f"EIGENWATCH_SIGNATURE_LAYER: layer {cfg.signature_layer} is not one of the tapped layers "
                         f"{list(layers)}; add it to EIGENWATCH_LAYERS or pick one of them")
    head = find_head(model, getattr(getattr(model_config, "hf_config", None), "vocab_size", None))

    def failed(key: str) -> None:
        tap.hook_errors += 1
        tap._log_once(key, "eigenwatch: lexical signature step failed (%s; skipping; logged once)", key)

    log.info("eigenwatch: lexical signatures at layer %d through %s (%d terms, top %d, final norm %s)",
             want, head.source, head.vocab_size, cfg.signature_topk, head.norm)
    return SignatureBank(head, want, cfg.signature_topk, cfg.max_requests, failed)
