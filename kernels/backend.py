"""Which implementation runs each kernel (Triton or torch), chosen in one place.

EIGENWATCH_BACKEND=auto (default): Triton for CUDA tensors when Triton works
there, torch otherwise; a backend chosen automatically falls back quietly.
EIGENWATCH_BACKEND=torch: always torch. EIGENWATCH_BACKEND=triton: Triton
or an error saying why (on CPU only under TRITON_INTERPRET=1, which is how CI
runs the kernels).

The Triton ops (one per file): `triton_gram_update` (the window Gram's
incremental update, kernels/window_bank.py), `triton_eigvalsh` (the batched
centred eigensolver, kernels/gram.py) and `_sparton_kernel` (the fused sparse
head, kernels/sparton.py, for the dtypes it takes).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

CHOICES = ("auto", "torch", "triton")


def requested() -> str:
    value = os.environ.get("EIGENWATCH_BACKEND", "auto").strip().lower()
    if value not in CHOICES:
        raise ValueError(f"EIGENWATCH_BACKEND: expected one of {', '.join(CHOICES)}, got {value!r}")
    return value


@lru_cache(maxsize=None)
def _ops():
    """(triton_gram_update, triton_eigvalsh) when Triton can run here, else None."""
    try:
        from . import triton_eigvalsh, triton_gram_update
    except ImportError:
        return None
    if not (triton_gram_update.available() and triton_eigvalsh.available()):
        return None
    return triton_gram_update, triton_eigvalsh


def _choose(usable: bool, device, unsupported: str | None = None) -> bool:
    """The rules for one kernel: `usable` (Triton runs here), `unsupported` (why
    these inputs cannot go to the kernel, None if they can)."""
    choice = requested()
    if choice == "torch":
        return False
    if choice == "triton":
        if not usable:
            raise RuntimeError(
                "EIGENWATCH_BACKEND=triton: Triton is not usable here (needs triton with a CUDA GPU, "
                "or TRITON_INTERPRET=1 set before triton is imported); use auto or torch"
            )
        if unsupported:
            raise RuntimeError(f"EIGENWATCH_BACKEND=triton: {unsupported}; use auto or torch")
        return True
    return usable and unsupported is None and torch.device(device).type == "cuda"


def use_triton(device: torch.device) -> bool:
    """The window kernels (Gram update, eigensolver) on `device`."""
    return _choose(_ops() is not None, device)


SPARTON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@lru_cache(maxsize=None)
def sparton_kernel():
    """The Sparton Triton module when it can run here, else None."""
    try:
        from . import _sparton_kernel
    except ImportError:
        return None
    return _sparton_kernel if _sparton_kernel.available() else None


def use_sparton_triton(device: torch.device, dtype: torch.dtype) -> bool:
    """The sparse head on `device` in `dtype` (an explicit triton choice also
    checks the device and the interpreter state, raising with what to do)."""
    mod = sparton_kernel()
    unsupported = None if dtype in SPARTON_DTYPES else f"the Sparton kernel takes {SPARTON_DTYPES}, got {dtype}"
    use = _choose(mod is not None, device, unsupported)
    if use and requested() == "triton":
        mod.check_device("hidden", torch.device(device))
    return use


def triton_gram_update():
    ops = _ops()
    if ops is None:
        raise RuntimeError("Triton kernels are not available on this machine")
    return ops[0]


def triton_eigvalsh():
    ops = _ops()
    if ops is None:
        raise RuntimeError("Triton kernels are not available on this machine")
    return ops[1]
