"""Window spectra for many requests at once: three ways, side by side in one run.

CPU (always): R requests each get one new row per decode step; a spectrum is
needed every `stride` tokens.
- bank (the taps' path, kernels/window_bank.py + gram.py): `WindowBank.append`
  copies the rows into the ring every token (O(k)); at a boundary one batched
  centred Gram of the due windows and `gram.spectra` (`eigvalsh`).
- incremental Gram row: the design the bank replaced: every token, the new
  row's dot products with the W ring rows (O(W·k)) written into a kept Gram's
  row and column; at a boundary the kept Gram is centred and solved.
- recompute: every token, the centred W×k window's Gram and `eigvalsh` from
  scratch (what a naive tap does), batched over requests.

GPU (when CUDA and Triton are there; runs unchanged with only torch, triton and
numpy installed): bench/gpu_spectra.py against the DESIGN.md anchors.

    python bench/bench_spectra.py [--R 64] [--W 32] [--k 256] [--stride 16] [--steps 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _source  # noqa: E402

_source.ensure_kernels()
from eigenwatch.kernels.gram import spectra  # noqa: E402
from eigenwatch.kernels.window_bank import WindowBank  # noqa: E402


def run_bank(rows: torch.Tensor, w: int, stride: int) -> float:
    # rows: [steps, R, k]
    steps, r, k = rows.shape
    bank = WindowBank(w, k, max_slots=r, initial_slots=r)
    slots = list(range(r))
    t0 = time.perf_counter()
    for t in range(steps):
        bank.append(slots, rows[t])
        if (t + 1) % stride == 0 and t + 1 >= 2:
            grams, valid = bank.window_gram(slots)
            spectra(grams, valid, 1.0 / k)
    return time.perf_counter() - t0


def run_gram_rows(rows: torch.Tensor, w: int, stride: int) -> float:
    steps, r, k = rows.shape
    ring = torch.zeros(r, w, k)
    gram = torch.zeros(r, w, w)
    idx = torch.arange(r)
    t0 = time.perf_counter()
    for t in range(steps):
        pos = t % w
        ring[:, pos] = rows[t]
        dots = torch.bmm(rows[t][:, None, :], ring.transpose(1, 2))[:, 0]  # [R, W]
        gram[idx, pos, :] = dots
        gram[idx, :, pos] = dots
        if (t + 1) % stride == 0 and t + 1 >= 2:
            spectra(gram, min(t + 1, w), 1.0 / k)  # centres the raw Gram
    return time.perf_counter() - t0


def run_recompute(rows: torch.Tensor, w: int) -> float:
    steps, r, k = rows.shape
    t0 = time.perf_counter()
    for t in range(steps):
        win = rows[max(0, t + 1 - w) : t + 1].transpose(0, 1)  # [R, W', k]
        if win.shape[1] < 2:
            continue
        xc = win - win.mean(1, keepdim=True)
        gram = (xc @ xc.transpose(1, 2)) / k
        torch.linalg.eigvalsh(gram.double())
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--R", type=int, default=64)
    p.add_argument("--W", type=int, default=32)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--stride", type=int, default=16)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(args.steps, args.R, args.k, generator=g) + 3.0
    bank, inc, rec = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all three
        bank.append(run_bank(rows, args.W, args.stride))
        inc.append(run_gram_rows(rows, args.W, args.stride))
        rec.append(run_recompute(rows, args.W))
    tokens = args.steps * args.R
    mb, mi, mr = statistics.median(bank), statistics.median(inc), statistics.median(rec)
    print(f"CPU ({torch.get_num_threads()} threads): R={args.R} W={args.W} k={args.k} stride={args.stride}, "
          f"{args.steps} decode steps, median of {args.repeats}")
    print(f"  {'path':60s} {'us/token':>9s} {'vs recompute':>13s}")
    print(f"  {'recompute centred Gram + eigvalsh every token':60s} {mr / tokens * 1e6:9.2f} {1.0:12.2f}x")
    print(f"  {'incremental Gram row every token, eigvalsh every stride':60s} {mi / tokens * 1e6:9.2f} "
          f"{mr / mi:12.2f}x")
    print(f"  {'bank: ring copy every token, Gram + eigvalsh every stride':60s} {mb / tokens * 1e6:9.2f} "
          f"{mr / mb:12.2f}x")

    if torch.cuda.is_available():
        import gpu_spectra

        for line in gpu_spectra.run_gpu_bench():
            print(line)
    else:
        print("GPU: no CUDA device here; run this same script on an H100/H200 for the GPU table")


if __name__ == "__main__":
    main()
