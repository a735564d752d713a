"""The window-spectra backend, chosen in one place.

EIGENWATCH_BACKEND=auto (default): Triton for CUDA tensors when Triton works
there, torch otherwise; a backend chosen automatically falls back quietly.
EIGENWATCH_BACKEND=torch: always torch. EIGENWATCH_BACKEND=triton: Triton
or an error saying why (on CPU only under TRITON_INTERPRET=1, which is how CI
runs the kernels).
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
def _triton_module():
    try:
        from . import triton_spectra
    except ImportError:
        return None
    return triton_spectra if triton_spectra.available() else None


def use_triton(device: torch.device) -> bool:
    choice = requested()
    if choice == "torch":
        return False
    mod = _triton_module()
    if choice == "triton":
        if mod is None:
            raise RuntimeError(
                "EIGENWATCH_BACKEND=triton: Triton is not usable here (needs triton with a CUDA GPU, "
                "or TRITON_INTERPRET=1 set before triton is imported); use auto or torch"
            )
        return True
    return mod is not None and device.type == "cuda"


def triton_spectra():
    mod = _triton_module()
    if mod is None:
        raise RuntimeError("Triton kernels are not available on this machine")
    return mod
