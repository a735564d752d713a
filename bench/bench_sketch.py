"""Streaming top-eigenvector sketches against plain Oja, IncrementalPCA and Frequent Directions,
side by side in one run, scored against the exact top eigenvector of the whole stream.

Streams (generated in blocks, never held whole; every number below is fixed by --seed, d and R):
- Spiked covariance with gap R: population eigenvalues λ₁ = R, λ_j = (j − 1)^(−1/2) for j = 2..d
  (so λ₂ = 1 and λ₁/λ₂ = R; a slowly decaying tail, stable rank ≈ (R + 2√d)/R), eigenvectors
  v_j = H e_j with H = H₂H₁ two Householder reflections about seeded random unit vectors (dense,
  O(d) per row to apply). Rows a = H(√λ ⊙ z), z ~ N(0, I_d), i.i.d.
- `random`: those i.i.d. rows as drawn (i.i.d. rows are in uniformly random order).
- `sorted`: the same kind of rows presented in descending |⟨a, v₁⟩|: the n values z₁ are drawn
  first, sorted by decreasing |z₁|, the other d − 1 coordinates drawn block by block. Adversarial:
  the last half of the stream carries almost no v₁ energy (|z₁| < 0.67), so anything that forgets
  (fixed-η Oja with a large η) or that trusts late rows more (epoch power steps) ends near v₂.
- `bursts`: the random stream with 10 bursts of 20 consecutive heavy rows written over it at seeded
  uniform positions; burst b's rows are ±c·w_b (random signs) along one seeded random unit vector w_b,
  with c² = 0.5·n/20, so each burst puts 0.5·λ₂·n of energy on one direction within 20 rows
  (c² ≈ 5000 at n = 200k, against a typical ‖a‖² ≈ R + 2√d): the top eigenvector of the whole stream
  stays v₁, but each burst dominates its neighbourhood, and every burst row is heavy in the
  Kacham–Woodruff sense for n ≥ ~50k at d = 1024.
The score is |⟨v, v₁⟩| with v₁ the exact top eigenvector of the realised stream's AᵀA (float64,
accumulated block by block by tests/reference.py), printed beside the realised gap λ₁/λ₂.

Methods (memory in rows of d floats):
- oja_grid: kernels.sketch.OjaGrid, defaults (12 η, held-back sample 1024, rows over 8× the running
  mean ‖a‖² clipped, last iterate, tail average or checkpoint of a run chosen online on the held-back
  sample).
- heavy_light: kernels.sketch.HeavyLight, defaults (shuffle 1024, heavy 64, block 8).
- oja_best4: plain fixed-η Oja (tests/reference.py, one row at a time, float64), η = h/s with s the
  first block's mean ‖a‖², h ∈ {3e-4, 1e-3, 3e-3, 1e-2}, the best of the four chosen in hindsight.
- ipca: scikit-learn IncrementalPCA(n_components=8), partial_fit on batches of 5d rows
  (when d > --ipca-max-d, one batch of 5d rows costs an SVD of 5d × d: skipped, or with --ipca-prefix N
  timed on the first N rows only and printed without an accuracy, `ipca(prefix)`).
- fd8: FrequentDirections ℓ = 8; fd_mem: ℓ chosen so 2ℓ·d matches oja_grid's memory, capped at --fd-max-l
  (128; the label then shows both: at ℓ ≈ 540 FD's shrinks would dominate the run).
rows/s counts update + final estimate time only (stream generation and the reference excluded);
the machine is noted in the header. The block sweep (--sweep) measures OjaGrid's closed-form block
size b against a per-row loop (the sequential recurrence vectorised over the grid), numpy and torch.

--live times the tap's path instead (hooks/sketches.py LayerSketches.add_step, torch on the CPU): µs per
step for 3 layers × 64 rows at d = 256 (the tiny Llama at 64 concurrent decodes), 3 × 16 and 8 × 64 at
d = 1024, and ms per finished window's directions() (the exporter thread's share).

    python bench/bench_sketch.py [--d 1024 4096] [--n 200000] [--gaps 1.5 3 10 30]
                                 [--orders random sorted bursts] [--quick] [--sweep] [--ipca-max-d 1024]
                                 [--ipca-prefix N] [--fd-max-l 128] [--threads 1] [--live [--steps 400]]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _source  # noqa: E402
import reference  # noqa: E402

_source.ensure_kernels()  # a bare checkout on a GPU host: kernels/ without the package
from eigenwatch.kernels.sketch import FrequentDirections, HeavyLight, OjaGrid  # noqa: E402

ORDERS = ("random", "sorted", "bursts")
OJA_STEPS = (3e-4, 1e-3, 3e-3, 1e-2)
BLOCK = 4096
N_BURSTS, BURST_LEN = 10, 20


# ---- streams ----

def _unit(rng, d):
    u = rng.standard_normal(d)
    return u / np.linalg.norm(u)


def stream_blocks(d: int, n: int, gap: float, order: str, seed: int, block: int = BLOCK):
    """Yield float64 blocks [≤block, d] of the stream described in the module docstring."""
    key = [seed, d, int(round(gap * 1000))]
    rng = np.random.default_rng(key)
    lam = np.concatenate([[gap], np.arange(1, d, dtype=np.float64) ** -0.5])
    sq = np.sqrt(lam)
    h1, h2 = _unit(rng, d), _unit(rng, d)
    z1 = None
    if order == "sorted":
        z1 = np.random.default_rng(key + [1]).standard_normal(n)
        z1 = z1[np.argsort(-np.abs(z1), kind="stable")]
    bursts = []
    if order == "bursts":
        brng = np.random.default_rng(key + [2])
        starts = np.sort(brng.integers(0, n - BURST_LEN, N_BURSTS))
        c = np.sqrt(0.5 * n / BURST_LEN)
        for s in starts:
            w = _unit(brng, d)
            signs = brng.choice([-1.0, 1.0], BURST_LEN)
            bursts.append((int(s), c * signs[:, None] * w[None, :]))
    for start in range(0, n, block):
        m = min(block, n - start)
        z = np.random.default_rng(key + [3, start]).standard_normal((m, d))
        if z1 is not None:
            z[:, 0] = z1[start:start + m]
        x = z * sq
        x -= 2.0 * np.outer(x @ h1, h1)
        x -= 2.0 * np.outer(x @ h2, h2)
        for s, rows in bursts:  # overwrite the part of each burst inside this block
            lo, hi = max(s, start), min(s + BURST_LEN, start + m)
            if lo < hi:
                x[lo - start:hi - start] = rows[lo - s:hi - s]
        yield x


# ---- methods: update(x32 block) + estimate() -> numpy [d] ----

class Timed:
    def __init__(self, name, memory_rows):
        self.name, self.memory_rows, self.seconds = name, memory_rows, 0.0
        self.rows = None  # rows the timing covers (None: the whole stream)


class SketchMethod(Timed):
    def __init__(self, name, sketch):
        super().__init__(name, sketch.memory_floats() / sketch.config.dim)
        self.sketch = sketch

    def update(self, x32, x64):
        t = time.perf_counter()
        self.sketch.update(x32)
        self.seconds += time.perf_counter() - t

    def estimate(self):
        t = time.perf_counter()
        v = self.sketch.estimate()
        self.seconds += time.perf_counter() - t
        return np.asarray(v, dtype=np.float64), ""


class OjaBest4(Timed):
    """Plain per-row fixed-η Oja (tests/reference.py), four η; reports the best in hindsight."""

    def __init__(self, d, seed):
        super().__init__("oja_best4", 1)
        v0 = np.random.default_rng(seed).standard_normal(d)
        self.v = [v0 / np.linalg.norm(v0) for _ in OJA_STEPS]
        self.eta = None

    def update(self, x32, x64):
        if self.eta is None:
            s = float((x64 * x64).sum(-1).mean())
            self.eta = [h / s for h in OJA_STEPS]
        t = time.perf_counter()
        self.v = [reference.oja_fixed_eta(v, x64, e) for v, e in zip(self.v, self.eta)]
        self.seconds += (time.perf_counter() - t) / len(OJA_STEPS)  # rows/s of one run

    def estimate(self):
        return self.v, ""


class IPCA(Timed):
    def __init__(self, d, k=8, prefix=None):
        from sklearn.decomposition import IncrementalPCA

        super().__init__("ipca" if prefix is None else "ipca(prefix)", 5 * d + k + 1)
        self.model = IncrementalPCA(n_components=k, batch_size=5 * d)
        self.batch, self.pending = 5 * d, []
        self.prefix = prefix  # fit only the first `prefix` rows: rows/s only, no accuracy
        if prefix is not None:
            self.rows = 0

    def _fit(self, rows):
        t = time.perf_counter()
        self.model.partial_fit(rows)
        self.seconds += time.perf_counter() - t
        if self.prefix is not None:
            self.rows += len(rows)

    def update(self, x32, x64):
        if self.prefix is not None:
            if self.rows >= self.prefix:
                return
            x32 = x32[: self.prefix - self.rows - sum(len(p) for p in self.pending)]
        self.pending.append(x32)
        have = sum(len(p) for p in self.pending)
        if have >= self.batch:
            rows = np.concatenate(self.pending)
            cut = (len(rows) // self.batch) * self.batch
            for i in range(0, cut, self.batch):
                self._fit(rows[i:i + self.batch])
            self.pending = [rows[cut:]] if cut < len(rows) else []

    def estimate(self):
        if self.prefix is not None:
            return None, f"timed on the first {self.rows} rows only"
        rest = np.concatenate(self.pending) if self.pending else np.zeros((0, 1))
        if len(rest) >= self.model.n_components:
            self._fit(rest)
        return self.model.components_[0].astype(np.float64), ""


def run_stream(d, n, gap, order, seed, methods):
    def feed():
        for x in stream_blocks(d, n, gap, order, seed):
            x32 = x.astype(np.float32)
            for m in methods:
                m.update(x32, x)
            yield x

    w, u = reference.stream_top_eigvecs(feed(), k=2)
    v1 = u[:, 0]
    rows = []
    for m in methods:
        v, note = m.estimate()
        if v is None:  # timed on a prefix: no accuracy to report
            score = float("nan")
        elif isinstance(v, list):  # best of several in hindsight
            scores = [abs(float(x @ v1)) for x in v]
            best = int(np.argmax(scores))
            score, note = scores[best], f"h={OJA_STEPS[best]:g}"
        else:
            score = abs(float(v @ v1))
        rows.append((m.name, score, (m.rows or n) / max(m.seconds, 1e-12), m.memory_rows, note))
    return w[0] / w[1], rows


def make_methods(d, seed, ipca_max_d, ipca_prefix, fd_max_l):
    grid = OjaGrid(d, seed=seed)
    methods = [SketchMethod("oja_grid", grid), SketchMethod("heavy_light", HeavyLight(d, seed=seed)),
               OjaBest4(d, seed)]
    if d <= ipca_max_d:
        methods.append(IPCA(d))
    elif ipca_prefix:
        methods.append(IPCA(d, prefix=ipca_prefix))
    methods.append(SketchMethod("fd8", FrequentDirections(d, ell=8)))
    ell = max(2, grid.memory_floats() // (2 * d))
    if ell > fd_max_l:  # FD's shrink (an eigh of 2ℓ rows every ℓ rows) at ℓ ≈ 540 would dominate the run
        methods.append(SketchMethod(f"fd_mem(l={fd_max_l}<{ell})", FrequentDirections(d, ell=fd_max_l)))
    else:
        methods.append(SketchMethod(f"fd_mem(l={ell})", FrequentDirections(d, ell=ell)))
    return methods


# ---- OjaGrid block-size sweep (the batching choice) ----

def per_row_grid(v, x, eta):
    # the sequential recurrence, one row at a time, vectorised over the G runs
    for a in x:
        v += eta[:, None] * (v @ a)[:, None] * a[None, :]
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sweep(d, rows, seed, threads=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d)).astype(np.float32) / np.sqrt(d)
    print(f"\nOjaGrid update cost vs closed-form block size b (d={d}, G=12, {rows} rows, float32; "
          f"median of 5; rows/s; {threads} thread(s)):")
    out = {}
    sk0 = OjaGrid(d, seed=seed)
    eta = (sk0.config.steps / 1.0).astype(np.float32)
    ts = []
    for _ in range(5):
        v = np.tile(np.asarray(sk0.v), (1, 1)).copy()
        t = time.perf_counter()
        per_row_grid(v, x[: rows // 4], eta)
        ts.append(time.perf_counter() - t)
    out["per-row loop (numpy)"] = (rows // 4) / statistics.median(ts)
    backends = [("numpy", None)]
    try:
        import torch

        torch.set_num_threads(threads)  # same rule as BLAS: torch has its own intra-op pool
        backends.append(("torch-cpu", "cpu"))
    except ImportError:
        pass
    for label, dev in backends:
        for b in (16, 32, 64, 128, 256):
            ts = []
            for _ in range(5):
                sk = OjaGrid(d, block=b, seed=seed, row_scale=1.0, device=dev)
                xin = x if dev is None else __import__("torch").from_numpy(x)
                t = time.perf_counter()
                sk.update(xin)
                ts.append(time.perf_counter() - t)
            out[f"block b={b} ({label})"] = rows / statistics.median(ts)
    base = out["per-row loop (numpy)"]
    for k, r in out.items():
        print(f"  {k:28s} {r:12,.0f}   x{r / base:6.1f} vs per-row loop")


def gpu_section(d, rows, seed):
    try:
        import torch
    except ImportError:
        print("\nGPU: skipped (torch not installed)")
        return
    if not torch.cuda.is_available():
        print("\nGPU: skipped (no CUDA device here; the same classes run on a CUDA tensor's device)")
        return
    dev = "cuda"
    x = torch.randn(rows, d, device=dev) / d**0.5
    print(f"\nGPU ({torch.cuda.get_device_name()}): update of {rows} rows in steps of 256, d={d}, median of 3")
    for name, mk in [("oja_grid", lambda: OjaGrid(d, device=dev, row_scale=1.0)),
                     ("heavy_light", lambda: HeavyLight(d, device=dev)),
                     ("fd8", lambda: FrequentDirections(d, ell=8, device=dev))]:
        ts = []
        for _ in range(3):
            sk = mk()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(0, rows, 256):
                sk.update(x[i:i + 256])
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        med = statistics.median(ts)
        print(f"  {name:12s} {rows / med:14,.0f} rows/s   {1e3 * med / (rows / 256):8.3f} ms per 256-row step")


def live_section(steps: int, threads: int) -> None:
    import torch

    from eigenwatch.hooks.sketches import LayerSketches

    torch.set_num_threads(threads)
    print(f"\nlive tap path (LayerSketches.add_step, every=4096, sample=1, torch CPU, {threads} thread(s), "
          f"{steps} steps, median of 3):")
    for d, layers, rows in [(256, 3, 64), (1024, 3, 16), (1024, 8, 64)]:
        g = torch.Generator().manual_seed(0)
        data = [torch.randn(rows, d, generator=g) for _ in range(8)]
        items = [(f"r{i}", i * (rows // 8), (i + 1) * (rows // 8)) for i in range(8)]
        per_step, per_window = [], []
        for _ in range(3):
            ls = LayerSketches(4096)
            for s in range(20):
                ls.add_step({l: data[(s + l) % 8] for l in range(layers)}, items)
            wins = []
            t = time.perf_counter()
            for s in range(steps):
                wins.extend(ls.add_step({l: data[(s + l) % 8] for l in range(layers)}, items))
            per_step.append((time.perf_counter() - t) / steps)
            t = time.perf_counter()
            for w in wins:
                w.directions()
            per_window.append((time.perf_counter() - t) / max(len(wins), 1))
        print(f"  d={d:5d} layers={layers} rows/step={rows:3d}  {1e6 * statistics.median(per_step):9.1f} µs/step"
              f"  {1e3 * statistics.median(per_window):7.2f} ms per window's directions()")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--gaps", type=float, nargs="+", default=[1.5, 3.0, 10.0, 30.0])
    ap.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ipca-max-d", type=int, default=1024)
    ap.add_argument("--ipca-prefix", type=int, default=0,
                    help="d > --ipca-max-d: time IncrementalPCA on this many first rows (no accuracy); 0: skip it")
    ap.add_argument("--fd-max-l", type=int, default=128, help="cap on fd_mem's ℓ (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads for every method (default 1)")
    ap.add_argument("--quick", action="store_true", help="d=256, n=20000, gaps 1.5 and 10")
    ap.add_argument("--sweep", action="store_true", help="also the OjaGrid block-size sweep and GPU timing")
    ap.add_argument("--live", action="store_true", help="only the tap's per-step sketch cost (hooks/sketches.py)")
    ap.add_argument("--steps", type=int, default=400, help="steps per --live case (default %(default)s)")
    args = ap.parse_args(argv)
    if args.live:
        live_section(args.steps, args.threads)
        return
    if args.quick:
        args.d, args.n, args.gaps = [256], 20_000, [1.5, 10.0]
    for name in ("d", "gaps"):
        bad = [v for v in getattr(args, name) if v <= (1 if name == "gaps" else 1)]
        if bad:
            ap.error(f"--{name}: expected values > 1, got {bad}")
    if args.n < 2 * BLOCK // 4:
        ap.error(f"--n: expected at least {2 * BLOCK // 4} rows, got {args.n}")
    from threadpoolctl import threadpool_limits

    # One BLAS thread for every method: on a small shared machine a 2-thread OpenBLAS spin-waits against
    # other processes and runs small products ~10x slower, which would rank methods by call size.
    threadpool_limits(args.threads)
    print(f"bench_sketch: n={args.n}, seed={args.seed}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores (shared with other jobs), BLAS threads={args.threads}; numpy {np.__version__}")
    if args.sweep:
        sweep(min(args.d), 16384, args.seed, args.threads)
        gpu_section(max(args.d), 65536, args.seed)
    for d in args.d:
        for gap in args.gaps:
            for order in args.orders:
                methods = make_methods(d, args.seed, args.ipca_max_d, args.ipca_prefix, args.fd_max_l)
                t = time.perf_counter()
                real_gap, rows = run_stream(d, args.n, gap, order, args.seed, methods)
                print(f"\nd={d} R={gap:g} order={order}  (realised λ1/λ2 = {real_gap:.3f}; {time.perf_counter() - t:.0f} s)")
                ipca = next((r[2] for r in rows if r[0].startswith("ipca")), None)
                print(f"  {'method':16s} {'|<v,v1>|':>9s} {'rows/s':>12s} {'x ipca':>7s} {'mem rows':>9s}")
                for name, score, rate, mem, note in rows:
                    ratio = f"{rate / ipca:7.1f}" if ipca else "      -"
                    print(f"  {name:16s} {score:9.4f} {rate:12,.0f} {ratio} {mem:9.0f}  {note}")
                if d > args.ipca_max_d and not args.ipca_prefix:
                    print(f"  ipca skipped (d > --ipca-max-d={args.ipca_max_d}: each 5d-row batch is an SVD of {5 * d}x{d})")


if __name__ == "__main__":
    main()
