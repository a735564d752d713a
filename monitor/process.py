"""Process-wide tuning that numpy and the C library leave to us: how many
threads numpy's BLAS may use, and when glibc returns freed memory. Shared by the
sidecar (Filter, Gram spectra) and the offline commands (a torch model next to
numpy's linear algebra)."""

from __future__ import annotations


def limit_blas_threads(n: int) -> str | None:
    """Cap numpy's BLAS at n threads for this whole process (OpenBLAS's count is
    process-wide). Why: the sidecar runs niced on cores it shares, and a BLAS that
    splits one product over threads waits for whichever was descheduled —
    bench/bench_filter.py measures a 1,000 × 384 Filter. Returns why it could not,
    or None."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # not a sidecar dependency: numpy's own OpenBLAS, directly
        return openblas_set_threads(n)
    threadpool_limits(limits=n, user_api="blas")  # not as a context: stays for the process's life
    return None


def openblas_set_threads(n: int) -> str | None:
    """Call the loaded OpenBLAS's own thread setter (what threadpoolctl does; Linux,
    where numpy's wheels bundle OpenBLAS, its symbols prefixed by scipy-openblas
    and suffixed 64_ for the 64-bit-integer build). Returns why it could not, or None."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = sorted({p[-1] for p in map(str.split, f) if len(p) >= 6 and "openblas" in p[-1].rsplit("/", 1)[-1]})
    except OSError:
        paths = []
    done = 0
    for path in paths:  # numpy's, and scipy's or torch's when they are loaded too
        lib = ctypes.CDLL(path)  # already loaded: the same handle
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(ctypes.c_int(n))
                done += 1
                break
    if done:
        return None
    return (f"found no OpenBLAS in this process to limit; set OPENBLAS_NUM_THREADS={n} (or MKL_NUM_THREADS) in "
            "the sidecar's environment, or install threadpoolctl")


def keep_freed_memory() -> str | None:
    """glibc: serve buffers up to 32 MiB from the heap and keep what is freed (up to
    256 MiB) instead of mapping and unmapping each one. Why: a 1,000 × 384 Filter
    makes ~10 MB of short-lived buffers (the request's bytes, numpy temporaries, the
    reply); on fresh pages that is ~2,500 page faults a call. Measured on 2 cores,
    1,000 × 384 with k = 128: server time 5.3 -> 2.7 ms, faults 2,461 -> 29 per call.
    Returns why it could not, or None."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "not glibc: buffers keep the C library's defaults"
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    if not (mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 256 << 20)):
        return "mallopt refused the thresholds"
    return None
