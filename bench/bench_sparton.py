"""Sparton sparse head: our paths against the naive torch head and the bare GEMM,
measured side by side in one run (same process, same inputs, interleaved rounds).

    python bench/bench_sparton.py           # CPU part, then the GPU part when CUDA is present
    python bench/bench_sparton.py --tiles   # CPU: also sweep the torch path's tile budget
    python bench/bench_sparton.py --sweep   # GPU: also time alternative Triton tile configs
    python bench/bench_sparton.py --smoke   # tiny shapes, seconds (tests run cpu_case/gpu_case like this)

Methods, per case:
  naive        full [B, S, V] logits, log1p(relu(.)), masked, amax over tokens (the usual SPLADE code)
  tiled 8192   the same per vocab tile of 8192 (DESIGN.md's "vocab-tiled torch" anchor)
  ours torch   eigenwatch.kernels.sparton, torch path (inference: no argmax kept)
  ours +argmax the same forward keeping the argmax for backward (what training runs)
  ours triton  the fused Triton kernel (GPU only), inference and +argmax
  bare GEMM    torch.mm(H, Wᵀ) into [B·S, V]: the floor every method has to do

CPU: time = median (and min) of interleaved rounds of time.perf_counter; ratio =
median / bare GEMM's median. Peak extra memory = high-water RSS above the RSS
before the call, measured in a child process: glibc is pinned to mmap every block
≥ 128 KiB (MALLOC_MMAP_THRESHOLD_) and MKL's buffer cache is off
(MKL_DISABLE_FAST_MM), so every temporary faults fresh pages, including ones
torch's allocator never sees (MKL/oneDNN packing buffers); the high-water mark is
reset before each method through /proc/self/clear_refs, after a small warm-up
call that loads the code. Outputs count as extra. tracemalloc would see none of it.
GPU: triton.testing.do_bench medians; memory = torch.cuda.max_memory_allocated
above what was allocated before the call.
err = max |ours - ref| / max |ref| against tests/reference.py (float64) on the
first 2048 vocab entries. Numbers belong to the machine they ran on; never a CI gate.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
import _source  # noqa: E402
import reference  # noqa: E402

MiB = 1 << 20
REF_V = 2048  # vocab entries checked against the float64 reference


def load_sparton():
    """eigenwatch.kernels.sparton, imported from this checkout on a host without the
    package installed (a GPU box with only torch and triton: bench/_source.py)."""
    _source.ensure_kernels()
    return importlib.import_module("eigenwatch.kernels.sparton")


# --------------------------------------------------------------------------- the methods


def naive(h, m, w, b):
    logits = torch.matmul(h, w.T)  # [B, S, V]
    if b is not None:
        logits = logits + b
    return (torch.log1p(torch.relu(logits)) * m[:, :, None]).amax(dim=1)


def tiled_8192(h, m, w, b):
    B, S, D = h.shape
    V = w.shape[0]
    out = torch.empty((B, V), device=h.device, dtype=h.dtype)
    mm = m[:, :, None]
    for v0 in range(0, V, 8192):
        logits = torch.matmul(h, w[v0 : v0 + 8192].T)
        if b is not None:
            logits = logits + b[v0 : v0 + 8192]
        out[:, v0 : v0 + 8192] = (torch.log1p(torch.relu(logits)) * mm).amax(dim=1)
    return out


def bare_gemm(h, m, w, b):
    return torch.mm(h.reshape(-1, h.shape[-1]), w.T)


def methods(sp, device: str, tile_bytes=None, triton: bool = False) -> dict[str, Callable]:
    def ours(backend, need_idx, tiles=None):
        def run(h, m, w, b):
            k = (m != 0).view(torch.uint8)
            if tiles is not None:  # the torch path with another tile budget
                return sp._torch_forward(h, k, w, b, need_idx, tiles)[0]
            # The custom op sparse_head calls (it picks the backend; here it is forced).
            return torch.ops.eigenwatch.sparton_head(h, k, w, b, backend, need_idx)[0]

        return run

    out = {"naive": naive, "tiled 8192": tiled_8192, "ours torch": ours("torch", False),
           "ours torch +argmax": ours("torch", True)}
    if triton:
        out["ours triton"] = ours("triton", False)
        out["ours triton +argmax"] = ours("triton", True)
    for tb in tile_bytes or ():
        out[f"ours torch tile {tb / MiB:g} MiB"] = ours("torch", False, tb)
    out["bare GEMM"] = bare_gemm
    return out


# --------------------------------------------------------------------------- inputs and errors


def make_inputs(B, S, D, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(B, S, D, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device=device, dtype=dtype)
    b = (0.5 * torch.randn(V, generator=g)).to(device=device, dtype=dtype)
    m = torch.ones(B, S, device=device, dtype=torch.int64)  # every token counts: no padding to skip
    return h, m, w, b


def ref_slice(h, m, w, b) -> np.ndarray:
    def np64(t):
        return t.detach().to("cpu", torch.float64).numpy()

    return reference.sparse_head(np64(h), np64(m), np64(w[:REF_V]), np64(b[:REF_V]))[0]


def rel_err(out, want) -> float:
    got = out[:, :REF_V].detach().to("cpu", torch.float64).numpy()
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# --------------------------------------------------------------------------- CPU


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def mem_child(spec: dict) -> None:
    """Run in a fresh process: peak extra RSS of each method, one JSON line."""
    sp = load_sparton()
    dtype = getattr(torch, spec["dtype"])
    libc = ctypes.CDLL("libc.so.6")
    res = {}
    table = methods(sp, "cpu", spec.get("tiles"))
    small = make_inputs(2, 8, spec["D"], 300, dtype, "cpu", seed=1)
    h, m, w, b = make_inputs(spec["B"], spec["S"], spec["D"], spec["V"], dtype, "cpu")
    for name in spec["names"]:
        fn = table[name]
        fn(*small)  # load code pages (MKL, oneDNN kernels) before the measurement
        gc.collect()
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _status_kib("VmRSS")
        out = fn(h, m, w, b)
        peak = _status_kib("VmHWM")
        del out
        res[name] = (peak - base) * 1024
    print("MEM " + json.dumps(res), flush=True)


def cpu_memory(case: dict, names) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MKL_DISABLE_FAST_MM="1")
    spec = dict(case, names=list(names))
    proc = subprocess.run([sys.executable, __file__, "--mem-child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=1200)
    for line in proc.stdout.splitlines():
        if line.startswith("MEM "):
            return json.loads(line[4:])
    raise RuntimeError(f"memory child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def cpu_case(sp, case: dict, rounds: int) -> list[str]:
    dtype = getattr(torch, case["dtype"])
    h, m, w, b = make_inputs(case["B"], case["S"], case["D"], case["V"], dtype, "cpu")
    table = methods(sp, "cpu", case.get("tiles"))
    want = ref_slice(h, m, w, b)
    errs, times = {}, {name: [] for name in table}
    with torch.no_grad():
        for name, fn in table.items():  # warm-up and error
            out = fn(h, m, w, b)
            errs[name] = rel_err(out, want) if name != "bare GEMM" else float("nan")
            del out
        for _ in range(rounds):  # interleaved: load from other processes hits every method alike
            for name, fn in table.items():
                t0 = time.perf_counter()
                fn(h, m, w, b)
                times[name].append((time.perf_counter() - t0) * 1e3)
    mem = cpu_memory(case, table)
    floor = float(np.median(times["bare GEMM"]))
    lines = [f"CPU B{case['B']} S{case['S']} D{case['D']} V{case['V']} {case['dtype']}, {torch.get_num_threads()} "
             f"threads, {rounds} rounds"]
    for name in table:
        t = np.array(times[name])
        err = "" if name == "bare GEMM" else f"  err {errs[name]:.1e}"
        lines.append(f"  {name:24s} median {np.median(t):8.1f} ms  min {t.min():8.1f} ms  "
                     f"{np.median(t) / floor:5.2f}× GEMM  extra {mem[name] / MiB:8.1f} MiB{err}")
    return lines


# --------------------------------------------------------------------------- GPU


def cuda_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def cuda_extra(fn: Callable[[], object]) -> float:
    """Bytes allocated beyond what was allocated before the call, at the peak."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return float(torch.cuda.max_memory_allocated() - base)


def wall_ms(fn: Callable[[], object]) -> float:
    """Stand-in timer where do_bench cannot run (the interpreted test of this code)."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


SWEEP_TILES = ((128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
               (128, 64, 64, 4, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3))  # BLOCK_S, _V, _D, warps, stages


def gpu_case(sp, B, S, D, V, mem_goal, sweep: bool, device: str = "cuda",
             timer: Callable = cuda_ms, extra: Callable = cuda_extra, tiles=SWEEP_TILES) -> list[str]:
    h, m, w, b = make_inputs(B, S, D, V, torch.bfloat16, device)
    want = ref_slice(h, m, w, b)
    table = methods(sp, device, triton=True)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    lines = [f"GPU {name} B{B} S{S} D{D} V{V} bf16 (goal ≤ 1.05× GEMM, ≤ {mem_goal} MiB)"]
    res = {}
    with torch.no_grad():
        for label, fn in table.items():
            out = fn(h, m, w, b)  # warm-up (compiles the kernel) and error
            err = rel_err(out, want) if label != "bare GEMM" else float("nan")
            del out
            res[label] = (timer(lambda: fn(h, m, w, b)), extra(lambda: fn(h, m, w, b)), err)
        floor = res["bare GEMM"][0]
        for label, (ms, ex, err) in res.items():
            e = "" if label == "bare GEMM" else f"  err {err:.1e}"
            lines.append(f"  {label:24s} {ms:8.3f} ms  {ms / floor:5.2f}× GEMM  extra {ex / MiB:8.1f} MiB{e}")
        if sweep:
            k = sp._kernel_module()
            keep = (m != 0).view(torch.uint8)
            for (bs, bv, bd, warps, stages), flatten in itertools.product(tiles, (True, False)):
                cfg = k.KernelConfig(bs, bv, bd, warps, stages, flatten)
                try:
                    out, _ = k.forward(h, keep, w, b, False, cfg)
                    err = rel_err(out, want)
                    ms = timer(lambda: k.forward(h, keep, w, b, False, cfg))
                    ms_i = timer(lambda: k.forward(h, keep, w, b, True, cfg))
                except Exception as e:  # out of shared memory etc.: report and go on
                    lines.append(f"  sweep {cfg}: {type(e).__name__}: {str(e)[:80]}")
                    continue
                lines.append(f"  sweep {cfg}: {ms:.3f} ms ({ms / floor:.2f}× GEMM), +argmax {ms_i:.3f} ms, "
                             f"err {err:.1e}")
    return lines


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one round (for tests)")
    ap.add_argument("--tiles", action="store_true", help="CPU: sweep the torch path's tile budget")
    ap.add_argument("--sweep", action="store_true", help="GPU: time alternative Triton configs")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_child:
        mem_child(json.loads(args.mem_child))
        return
    sp = load_sparton()
    tiles = [2 * MiB, 4 * MiB, 12 * MiB, 16 * MiB] if args.tiles else None
    if args.smoke:
        cases = [dict(B=2, S=8, D=16, V=300, dtype="float32", tiles=[4096] if args.tiles else None)]
        rounds = 1
    else:
        cases = [dict(B=8, S=256, D=384, V=30522, dtype="float32", tiles=tiles)]
        if sp._cpu_has_bf16():
            cases.append(dict(B=8, S=256, D=384, V=30522, dtype="bfloat16"))
        rounds = args.rounds
    print(f"# CPU goal (fp32 case): ours ≤ 1.1× bare GEMM and ≤ 16 MiB extra; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    for case in cases:
        print("\n".join(cpu_case(sp, case, rounds)), flush=True)
    if not torch.cuda.is_available():
        print("GPU part skipped: no CUDA device (torch.cuda.is_available() is False)")
        return
    if sp._kernel_module() is None:
        print("GPU part skipped: triton is not installed or cannot run here")
        return
    gpu_cases = [(2, 16, 32, 300, 16)] if args.smoke else [(32, 256, 768, 30522, 16), (8, 512, 1024, 250002, 32)]
    for B, S, D, V, goal in gpu_cases:
        print("\n".join(gpu_case(sp, B, S, D, V, goal, args.sweep)), flush=True)


if __name__ == "__main__":
    main()
