"""The eigenwatch.v1.Sparse service: SparseEncode turns hidden states into sparse
lexical vectors through the --sparse-head file (numpy, no torch: the sidecar's
`encode` in monitor/sidecar/signatures.py, checked against kernels/sparton.py in
tests/test_signatures.py). The sidecar holds no model, so texts are not taken
here: `eigenwatch signatures encode` serves text in offline, the vLLM tap sends
live requests' signatures in frames."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from eigenwatch.hooks.frames import MAX_MESSAGE_BYTES
from eigenwatch.v1 import sparse_pb2, sparse_pb2_grpc

from .signatures import SparseHead, encode, top_terms

log = logging.getLogger("eigenwatch.sidecar.sparse")

SERVICE_NAME = sparse_pb2.DESCRIPTOR.services_by_name["Sparse"].full_name
NO_HEAD = ("no sparse head loaded: start the sidecar with --sparse-head PATH (a file from "
           "`eigenwatch signatures head --model ... --out head.npz`)")
MAX_TOKENS = 1 << 20  # batch × tokens of one call (each row is one GEMM row per vocab tile)


def check_request(req: sparse_pb2.SparseEncodeRequest, head: SparseHead) -> str | None:
    """What is wrong with a request's shape, naming the field; None when nothing is."""
    if req.batch == 0 or req.tokens == 0:
        return (f"batch, tokens: the batch is empty (batch={req.batch}, tokens={req.tokens}); send at least one "
                f"row of {head.dim} float32 values")
    if req.dim != head.dim:
        return f"dim: the loaded head takes hidden states of dim {head.dim}, got {req.dim}"
    n = req.batch * req.tokens
    if n > MAX_TOKENS:
        return f"batch, tokens: {req.batch} x {req.tokens} is over {MAX_TOKENS} tokens per call; split the batch"
    want = 4 * n * req.dim
    if len(req.hidden) != want:
        return (f"hidden: has {len(req.hidden)} bytes but batch x tokens x dim x 4 = {want} "
                f"(float32 little-endian, row-major [batch x tokens x dim])")
    if req.mask and len(req.mask) != n:
        return f"mask: has {len(req.mask)} bytes but batch x tokens = {n} (one byte per token: 1 counts, 0 not)"
    k = req.top_k or head.vocab_size
    if req.top_k > head.vocab_size:
        return f"top_k: {req.top_k} is over the head's vocabulary of {head.vocab_size} terms (accepted: 0..{head.vocab_size})"
    reply = req.batch * k * (8 + (16 if head.vocab is not None else 0)) + 1024
    if reply > MAX_MESSAGE_BYTES:
        return (f"top_k: the reply to {req.batch} row(s) of up to {k} terms would take ~{reply} bytes, over the "
                f"{MAX_MESSAGE_BYTES}-byte gRPC message limit; set top_k or split the batch")
    return None


def encode_request(head: SparseHead, req: sparse_pb2.SparseEncodeRequest) -> sparse_pb2.SparseEncodeResponse | str:
    """The reply for a well-shaped request, or what is wrong with its values."""
    x = np.frombuffer(req.hidden, dtype="<f4").reshape(req.batch, req.tokens, req.dim)
    mask = (np.frombuffer(req.mask, dtype=np.uint8).reshape(req.batch, req.tokens) if req.mask
            else np.ones((req.batch, req.tokens), dtype=np.uint8))
    bad = ~np.isfinite(x).all(axis=2) & (mask != 0)
    if bad.any():
        b, t = np.argwhere(bad)[0]
        return f"hidden: row {b} token {t} contains NaN or Inf (accepted: finite float32 values)"
    w = encode(head, x, mask)
    out = sparse_pb2.SparseEncodeResponse(vocab_size=head.vocab_size, head_sha256=head.sha256)
    for ids, weights in top_terms(w, req.top_k):
        out.vectors.add(ids=ids.tolist(), weights=weights.tolist(),
                        tokens=[] if head.vocab is None else head.vocab[ids].tolist())
    return out


class SparseService(sparse_pb2_grpc.SparseServicer):
    def __init__(self, cfg, head: SparseHead | None = None):
        self.cfg = cfg
        path = getattr(cfg, "sparse_head", None)
        self.head = head if head is not None else (SparseHead(path) if path else None)  # SignatureFileError
        # One thread: an encode takes one core; concurrent calls queue, the event loop never waits.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eigenwatch-sparse")

    @property
    def loaded(self) -> bool:
        return self.head is not None

    async def SparseEncode(self, request, context):
        head = self.head
        if head is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_HEAD)
        problem = check_request(request, head)
        if problem is None:
            try:
                out = await asyncio.get_running_loop().run_in_executor(self._pool, encode_request, head, request)
            except Exception:
                log.exception("SparseEncode failed on a %d x %d x %d batch", request.batch, request.tokens,
                              request.dim)
                raise
            if isinstance(out, str):
                problem = out
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return out

    async def GetSparseHead(self, request, context):
        head = self.head
        if head is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_HEAD)
        return sparse_pb2.SparseHeadInfo(path=head.path, vocab_size=head.vocab_size, dim=head.dim,
                                         has_bias=head.bias is not None, norm=head.norm, source=head.source,
                                         model=head.model, head_sha256=head.sha256)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown)
