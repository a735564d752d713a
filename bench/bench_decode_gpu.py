"""What the tap costs one decode step on a GPU, with CUDA graphs on: an
8B-shaped bf16 decoder (Llama-3-8B: 32 layers, hidden 4096, MLP 14336, 32
query / 8 KV heads, random weights) captured in a CUDA graph, at batch 8, 64
and 256, measured side by side in one run:

  graph            the decode step replayed from a CUDA graph (the baseline)
  graph + aux      the same graph also writing the residual stream of layers
                   L/4, L/2, 3L/4 into static buffers (what the aux-output path
                   asks of the model: nothing of eigenwatch inside the graph
                   but these copies)
  + post-step      graph + aux, then the tap's per-step work after the replay:
                   one batched copy of every request's rows at every tapped
                   layer into the window ring (kernels/window_bank.py), and
                   every `stride` steps one batched centred Gram of all windows
                   and their eigensolve (kernels/gram.py, Triton Jacobi), the
                   eigenvalues copied to pinned host memory asynchronously;
                   amortised over a stride
  + statistics     + post-step, and the combined score's live hidden-state
                   statistics (hooks/hidden.HiddenStatsTap.add_step, the tap's
                   own code): every request's row at every tapped layer
                   scored against a rank-256 token Gaussian (RowSqdist,
                   p = 4096: the residual form), summed per request, and
                   copied into its LLM-Check head while it has < 256 rows
                   (--no-hidden leaves it out)

Times are medians of CUDA-event-timed windows of `stride` steps, in ms per
step; ratios against `graph`. One window of post-step work first runs under
torch.cuda.set_sync_debug_mode("error"), and the first host synchronisation
it hits is printed (the goal: none). Needs torch and triton (no vLLM, no eigenwatch install: bench/_source.py
imports the kernels from this checkout). Without CUDA it says so and exits 0.

    python bench/bench_decode_gpu.py [--batches 8 64 256] [--context 512] [--layers 32] [--no-hidden]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _source  # noqa: E402

HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128


class Decoder(torch.nn.Module):
    """A Llama-shaped decoder for one decode step over a fixed KV cache (random weights)."""

    def __init__(self, layers: int, batch: int, context: int, taps: tuple[int, ...], device, dtype):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(0)
        rnd = lambda *shape: (torch.randn(*shape, generator=g, device=device, dtype=dtype) / math.sqrt(shape[-1]))
        self.layers = layers
        self.taps = taps
        self.qkv = [rnd((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN) for _ in range(layers)]
        self.o = [rnd(HIDDEN, HEADS * HEAD_DIM) for _ in range(layers)]
        self.up = [rnd(2 * MLP, HIDDEN) for _ in range(layers)]
        self.down = [rnd(HIDDEN, MLP) for _ in range(layers)]
        self.k_cache = [torch.randn(batch, KV_HEADS, context, HEAD_DIM, generator=g, device=device, dtype=dtype)
                        for _ in range(layers)]
        self.v_cache = [torch.randn_like(k) for k in self.k_cache]
        self.aux = torch.zeros(len(taps), batch, HIDDEN, device=device, dtype=dtype)  # static aux outputs

    @staticmethod
    def _norm(x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)

    def forward(self, h: torch.Tensor, write_aux: bool) -> torch.Tensor:  # h: [B, d]
        b = h.shape[0]
        for i in range(self.layers):
            qkv = self._norm(h) @ self.qkv[i].T
            q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
            q = q.view(b, HEADS, 1, HEAD_DIM)
            kc = torch.cat([self.k_cache[i], k.view(b, KV_HEADS, 1, HEAD_DIM)], dim=2)
            vc = torch.cat([self.v_cache[i], v.view(b, KV_HEADS, 1, HEAD_DIM)], dim=2)
            att = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
            h = h + att.reshape(b, HEADS * HEAD_DIM) @ self.o[i].T
            gate, up = (self._norm(h) @ self.up[i].T).chunk(2, dim=-1)
            h = h + (torch.nn.functional.silu(gate) * up) @ self.down[i].T
            if write_aux and i in self.taps:
                self.aux[self.taps.index(i)].copy_(h)
        return h


def _graph(model: Decoder, x: torch.Tensor, write_aux: bool):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(x, write_aux)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x, write_aux)
    return graph


def _per_step_ms(run_window, windows: int, stride: int) -> float:
    times = []
    for _ in range(windows + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_window()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / stride)
    return statistics.median(times[2:])


def hidden_step(taps: tuple[int, ...], rows: dict, batch: int, seed: int = 0):
    """HiddenStatsTap.add_step for `batch` requests decoding one row each at `taps`
    (rows {layer: [B, d]}, the aux buffers the graph writes), against synthetic rank-256
    token and pooled Gaussians, LLM-Check at the middle tap and a probe: a callable per step."""
    import numpy as np

    _source.ensure_hooks()
    from eigenwatch.hooks.hidden import HiddenCalibration, HiddenStatsTap
    from eigenwatch.kernels.hidden_stats import LinearProbe, LowRankGaussian

    rng = np.random.default_rng(seed)
    d = next(iter(rows.values())).shape[-1]
    r = min(256, d)

    def gaussian():
        U = np.linalg.qr(rng.standard_normal((d, r)))[0]
        return LowRankGaussian.from_state({"mean": rng.standard_normal(d).tolist(), "a": 0.05, "b": 0.95,
                                           "shrinkage": 0.05, "lam": np.geomspace(50, 0.05, r).tolist(),
                                           "U": U.tolist(), "p": d})

    cal = HiddenCalibration("bench", taps, {l: gaussian() for l in taps}, {l: gaussian() for l in taps},
                            taps[len(taps) // 2], "bench", LinearProbe(taps[0], rng.standard_normal(d), 0.0))
    tap = HiddenStatsTap(cal, max_requests=batch)
    items = [(f"r{i}", i, i + 1) for i in range(batch)]
    return lambda: tap.add_step(rows, items)


def bench_batch(batch: int, args) -> list[str]:
    from eigenwatch.kernels import backend
    from eigenwatch.kernels.gram import spectra
    from eigenwatch.kernels.window_bank import WindowBank

    dev, dtype = torch.device("cuda"), torch.bfloat16
    taps = (args.layers // 4, args.layers // 2, 3 * args.layers // 4)
    model = Decoder(args.layers, batch, args.context, taps, dev, dtype)
    x = torch.randn(batch, HIDDEN, device=dev, dtype=dtype)
    plain, with_aux = _graph(model, x, False), _graph(model, x, True)
    bank = WindowBank(args.window, HIDDEN, layers=taps, max_slots=batch, initial_slots=batch, device=dev)
    slots = list(range(batch))
    host = torch.empty(len(taps) * batch, args.window, dtype=torch.float32, pin_memory=True)
    for _ in range(args.window):  # fill the windows once: steady state
        bank.append(slots, model.aux.float())
    stats = hidden_step(taps, {l: model.aux[i] for i, l in enumerate(taps)}, batch) if args.hidden else None

    def post_step(step: int):
        bank.append(slots, model.aux)  # [L, B, d] bf16 rows, fp32 in the ring
        if step % args.stride == 0:
            grams, valid = bank.window_gram(slots)  # [L, B, W, W]
            eigs, _, _ = spectra(grams.view(-1, args.window, args.window), args.window, 1.0 / HIDDEN)
            host.copy_(eigs.float(), non_blocking=True)

    def window(graph, tap: bool, hidden: bool = False):
        for s in range(1, args.stride + 1):
            graph.replay()
            if tap:
                post_step(s)
            if hidden:
                stats()

    for _ in range(2):  # warm-up (Triton compiles here; the statistics' slots and bases are set up)
        window(with_aux, True, stats is not None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host sync in the per-step path raises
    sync = "none"
    try:
        window(with_aux, True, stats is not None)
    except RuntimeError as exc:  # reported, then timed anyway
        sync = str(exc).splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    base = _per_step_ms(lambda: window(plain, False), args.windows, args.stride)
    aux = _per_step_ms(lambda: window(with_aux, False), args.windows, args.stride)
    full = _per_step_ms(lambda: window(with_aux, True), args.windows, args.stride)
    hidden = ""
    if stats is not None:
        with_stats = _per_step_ms(lambda: window(with_aux, True, True), args.windows, args.stride)
        hidden = f" | + statistics {with_stats:7.3f} ms ({with_stats / base:.4f})"
    triton = backend.use_triton(dev)
    return [f"  batch {batch:4d}: graph {base:7.3f} ms | graph + aux {aux:7.3f} ms ({aux / base:.4f}) | "
            f"+ post-step {full:7.3f} ms ({full / base:.4f}){hidden}  [triton kernels: {triton}; host sync in the "
            f"post-step path: {sync}]"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--context", type=int, default=512, help="KV-cache length per request (default %(default)s)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--windows", type=int, default=20, help="timed windows of `stride` steps (default %(default)s)")
    p.add_argument("--no-hidden", dest="hidden", action="store_false",
                   help="leave out the live hidden-state statistics' column")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_decode_gpu: no CUDA device here, nothing measured (run it unchanged on a CUDA host)")
        return 0
    _source.ensure_kernels()
    print(f"bench_decode_gpu on {torch.cuda.get_device_name()}, torch {torch.__version__}: 8B-shaped bf16 decode "
          f"step ({args.layers} layers), context {args.context}, window {args.window}, stride {args.stride}; "
          f"ms per step, ratio to the CUDA-graph step")
    for b in args.batches:
        for line in bench_batch(b, args):
            print(line, flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
