"""Window spectra on the GPU: our Triton path vs the torch anchors of DESIGN.md,
measured side by side in one run (same device, same inputs).

    python bench/gpu_spectra.py

Per case (R slots, window W, row width d) and input dtype (bf16, fp32):
  svdvals   torch.linalg.svdvals of the R centred [W, d] windows
  gram+eigh centred Gram (bmm in the input dtype) + torch.linalg.eigvalsh
  ours      gram_update of one new row per slot + centred_eigvalsh of all slots
            (the per-step work when the Gram is kept incrementally), eager and
            inside a CUDA graph, plus its two parts and the "dot" variant.
Times are medians of triton.testing.do_bench, in ms; ratios are anchor / ours.
"err" is our max eigenvalue error against float64 eigvalsh, relative to the
largest eigenvalue. Numbers belong to the machine they were measured on; never
a CI gate. Needs only torch, triton and numpy: without eigenwatch installed,
bench/_source.py imports the kernels from this checkout.
"""

from __future__ import annotations

import pathlib
import sys
import time
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import _source  # noqa: E402

_source.ensure_kernels()
import reference  # noqa: E402

CASES = ((256, 32, 4096), (64, 64, 8192))  # (R, W, d), the window-spectra anchors of DESIGN.md
DTYPES = (torch.bfloat16, torch.float32)


def load_kernels():
    """The two Triton ops under one name (they need triton; without it this raises ImportError)."""
    from eigenwatch.kernels import triton_eigvalsh, triton_gram_update

    return SimpleNamespace(gram_update=triton_gram_update.gram_update,
                           centred_eigvalsh=triton_eigvalsh.centred_eigvalsh,
                           available=lambda: triton_gram_update.available() and triton_eigvalsh.available())


def wall_ms(fn: Callable[[], object]) -> float:
    """Stand-in timer for devices without triton's do_bench (CPU tests)."""
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def ref_eigvalsh(ring: torch.Tensor, dim: int) -> np.ndarray:
    """[R, W, d] -> [R, W] float64, descending eigenvalues of Xc Xcᵀ / dim (tests/reference.py)."""
    x = ring.detach().to("cpu", torch.float64).numpy()
    return np.stack([reference.window_eigenvalues(w) * w.shape[1] / dim for w in x])


def bench_case(ts, R: int, W: int, d: int, dtype: torch.dtype, device: str,
               timer: Callable[[Callable[[], object]], float],
               graph_timer: Callable[[Callable[[], object]], float] | None = None) -> list[str]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(R, W, d, generator=g).to(device=device, dtype=dtype)  # the windows
    new = torch.randn(R, d, generator=g).to(device=device, dtype=dtype)  # one new row per slot

    def svdvals():
        xf = x.float()
        return torch.linalg.svdvals(xf - xf.mean(dim=1, keepdim=True))

    def gram_eigh():
        xc = x - x.mean(dim=1, keepdim=True)
        return torch.linalg.eigvalsh((xc @ xc.transpose(1, 2)).float() / d)

    # Our state: ring [R, W, d] f32 and its raw Gram, kept up to date step by step.
    ring = x.float().contiguous()
    gram = (ring @ ring.transpose(1, 2)).contiguous()
    slots = torch.arange(R, device=device, dtype=torch.int64)
    pos = torch.zeros(R, device=device, dtype=torch.int64)  # overwrite the oldest row
    valid = torch.full((R,), W, device=device, dtype=torch.int64)

    def update():
        ts.gram_update(ring, gram, new, slots, pos)

    def eig(method="gather"):
        return ts.centred_eigvalsh(gram, valid, d, method=method)

    def ours():
        update()
        return eig()

    ev = ours().cpu().double().numpy()
    ref = ref_eigvalsh(ring, d)
    err = np.abs(ev - ref).max() / max(float(ref.max()), 1e-30)

    t_svd, t_geh = timer(svdvals), timer(gram_eigh)
    t_ours, t_upd, t_eig, t_dot = timer(ours), timer(update), timer(eig), timer(lambda: eig("dot"))
    if graph_timer is not None:
        try:
            t_graph = f"{graph_timer(ours):.3f}"
        except Exception as e:  # noqa: BLE001 - a failed capture is a result to print, not a crash
            t_graph = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    else:
        t_graph = "n/a (no CUDA graphs here)"
    name = str(dtype).replace("torch.", "")
    return [
        f"R{R} W{W} d{d} {name}: svdvals {t_svd:.3f} | gram+eigh {t_geh:.3f} | ours {t_ours:.3f} "
        f"(graph {t_graph}) = update {t_upd:.3f} + eig {t_eig:.3f} [eig dot {t_dot:.3f}] | "
        f"gram+eigh/ours {t_geh / t_ours:.2f}x, svdvals/ours {t_svd / t_ours:.1f}x | err {err:.1e}",
    ]


def run_gpu_bench() -> list[str]:
    if not torch.cuda.is_available():
        return ["gpu_spectra: no CUDA device here, nothing measured "
                "(the kernels are tested on CPU under TRITON_INTERPRET=1: tests/test_triton_spectra.py)"]
    import triton
    from triton.testing import do_bench, do_bench_cudagraph

    ts = load_kernels()

    def timer(fn):
        return do_bench(fn, return_mode="median")

    def graph_timer(fn):
        return do_bench_cudagraph(fn, return_mode="median")

    lines = [f"gpu_spectra on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}; median ms of triton do_bench"]
    for R, W, d in CASES:
        for dtype in DTYPES:
            lines += bench_case(ts, R, W, d, dtype, "cuda", timer, graph_timer)
            torch.cuda.empty_cache()
    return lines


if __name__ == "__main__":
    for line in run_gpu_bench():
        print(line, flush=True)
