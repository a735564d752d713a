"""The live hidden-state statistics' per-step work, timed and checked in one run.

- kernels/hidden_stats.RowSqdist (every captured row's token Mahalanobis, all
  tapped layers in one call) against the float64 numpy reference
  (LowRankGaussian.sqdist, one layer at a time): median ms per call and the
  largest relative difference per row, on rows of a spectrum over five decades
  with a dimension of large mean and small spread.
- hooks/hidden.HiddenStatsTap.add_step (when eigenwatch is installed: not on a
  bare GPU checkout): ms per prefill step and per decode step of R requests,
  before and past LLMCHECK_ROWS rows per request; and the exporter's finishing
  math for their final frames (hooks/hidden.part_values), batched against one
  frame at a time.

    python bench/bench_hidden.py [--p 256,384] [--rows 64,4096] [--layers 3] [--requests 64] [--device auto]

Numbers belong to the machine and moment they were measured on; never a CI gate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _source  # noqa: E402

_source.ensure_kernels()
from eigenwatch.kernels.hidden_stats import LLMCHECK_ROWS, LowRankGaussian, RowSqdist  # noqa: E402


def gaussian(p: int, rng) -> LowRankGaussian:
    """A token Gaussian of rank min(p, 256), variances over five decades."""
    g = LowRankGaussian()
    r = min(p, 256)
    g.p, g.a, g.b, g.shrinkage = p, 1e-2, 1.0, 0.1
    g.lam = np.geomspace(1e3, 1e-2, r)
    g.U = np.linalg.qr(rng.standard_normal((p, r)))[0]
    g.mean = rng.standard_normal(p)
    g.mean[0] = 3e3  # a "massive activation": large mean, the spread of the rest
    return g


def rows_of(g: LowRankGaussian, n: int, rng) -> np.ndarray:
    x = g.mean + (rng.standard_normal((n, len(g.lam))) * np.sqrt(g.b * g.lam)) @ g.U.T
    return (x + np.sqrt(g.a) * rng.standard_normal((n, g.p))).astype(np.float32)


def timed(fn, repeats: int, sync) -> float:
    fn()
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return 1e3 * statistics.median(out)


def bench_kernel(args, device, sync) -> None:
    rng = np.random.default_rng(0)
    print(f"RowSqdist ({device}, {torch.get_num_threads()} thread(s)) vs float64 numpy reference, "
          f"{args.layers} layers per call, median of {args.repeats}")
    for p in args.p:
        gs = [gaussian(p, rng) for _ in range(args.layers)]
        kern = RowSqdist(gs, device)
        for n in args.rows:
            X = np.stack([rows_of(g, n, rng) for g in gs])  # [G, n, p] float32
            x = torch.from_numpy(X).to(device)
            ref = np.stack([g.sqdist(X[i].astype(np.float64)) / p for i, g in enumerate(gs)])
            err = float(np.max(np.abs(kern(x).cpu().numpy() / ref - 1.0)))
            t_k = timed(lambda: kern(x), args.repeats, sync)
            t_r = timed(lambda: [g.sqdist(X[i].astype(np.float64)) for i, g in enumerate(gs)],
                        max(3, args.repeats // 4), lambda: None)
            print(f"  p={p} r={min(p, 256)} rows={n}: kernel {t_k:8.3f} ms  reference {t_r:8.3f} ms  "
                  f"ratio {t_k / t_r:6.3f}  max rel. diff {err:.1e}")


def bench_tap(args) -> None:
    try:
        from eigenwatch.hooks.hidden import HiddenCalibration, HiddenStatsTap, part_values
        from eigenwatch.kernels.hidden_stats import LinearProbe
    except ImportError as exc:
        print(f"HiddenStatsTap: skipped ({exc}; install eigenwatch to time the tap's step)")
        return
    rng = np.random.default_rng(1)
    R, layers = args.requests, tuple(range(1, args.layers + 1))
    print(f"HiddenStatsTap.add_step (cpu), {R} requests, layers {list(layers)}, LLM-Check at the middle one")
    for p in args.p:
        cal = HiddenCalibration("bench", layers, {l: gaussian(p, rng) for l in layers},
                                {l: gaussian(p, rng) for l in layers}, layers[len(layers) // 2], "bench",
                                LinearProbe(layers[0], rng.standard_normal(p), 0.0))
        tap = HiddenStatsTap(cal, max(512, 2 * R))
        one = {l: torch.randn(R, p) for l in layers}
        warm = [(f"w{i}", i, i + 1) for i in range(R)]
        tap.add_step(one, warm)  # set-up and slots for R requests, as a server in its steady state
        for rid, _, _ in warm:
            tap.finish(rid)
        prompt = 64
        pre = {l: torch.randn(R * prompt, p) for l in layers}
        t_pre = []
        for rep in range(5):  # the last round's requests stay for the decode steps
            t = time.perf_counter()
            tap.add_step(pre, [(f"r{rep}.{i}", i * prompt, (i + 1) * prompt) for i in range(R)])
            t_pre.append(time.perf_counter() - t)
            if rep < 4:
                for i in range(R):
                    tap.finish(f"r{rep}.{i}")
        decode = [(f"r4.{i}", i, i + 1) for i in range(R)]
        before, past = [], []
        for step in range(LLMCHECK_ROWS + 64 - prompt):
            t = time.perf_counter()
            tap.add_step(one, decode)
            (before if prompt + step < LLMCHECK_ROWS else past).append(time.perf_counter() - t)
        print(f"  p={p}: prefill {R}×{prompt} rows {1e3 * statistics.median(t_pre):7.2f} ms; decode step "
              f"{1e3 * statistics.median(before):6.3f} ms (< {LLMCHECK_ROWS} rows each), "
              f"{1e3 * statistics.median(past):6.3f} ms (past {LLMCHECK_ROWS})")
        # The exporter's finishing math for R requests' final frames at every layer: one batch
        # (what it runs) against one call per frame.
        parts = [part for i in range(R) for part in tap.finish(f"r4.{i}").values()]
        t_batch = timed(lambda: part_values(parts), 5, lambda: None)
        t_each = timed(lambda: [part.values() for part in parts], 5, lambda: None)
        print(f"  p={p}: finishing {len(parts)} frames ({R} requests, {LLMCHECK_ROWS} rows each for LLM-Check): "
              f"batched {t_batch:7.2f} ms, one by one {t_each:7.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", default="256,384", help="row widths, comma-separated")
    ap.add_argument("--rows", default="64,4096", help="rows per layer per call (a decode step, a prefill chunk)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the engine's worker uses 1 here)")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu or cuda")
    args = ap.parse_args()
    try:
        args.p = [int(v) for v in args.p.split(",")]
        args.rows = [int(v) for v in args.rows.split(",")]
    except ValueError:
        ap.error(f"--p and --rows: expected comma-separated integers, got {args.p!r} and {args.rows!r}")
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    bench_kernel(args, device, sync)
    bench_tap(args)


if __name__ == "__main__":
    main()
