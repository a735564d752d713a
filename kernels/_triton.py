"""What every Triton op of eigenwatch shares: the import guard, the checks of
where a kernel can run (CUDA, or Triton's interpreter on CPU for tests), and
argument checks. Importing this module without triton raises ImportError.

TRITON_INTERPRET=1 must be set before triton is first imported: triton.jit
reads it when a function is decorated, so triton's own library (tl.sort) and
our kernels must agree. On CPU that is how CI runs the kernels.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the sidecar/CPU install has no triton
    raise ImportError(
        "eigenwatch's Triton kernels need triton (pip install triton); "
        "the torch paths in eigenwatch.kernels work without it"
    ) from e

INT_DTYPES = (torch.int32, torch.int64)


def interpreted(kernel) -> bool:
    """True when `kernel` (a triton.jit function) runs in Triton's interpreter."""
    return type(kernel).__name__ == "InterpretedFunction"


def mixed(kernel) -> bool:
    # Set between `import triton` and our import, TRITON_INTERPRET makes triton's
    # library and our kernels disagree, and every launch fails.
    return interpreted(kernel) != (type(tl.sort).__name__ == "InterpretedFunction")


def available(kernel) -> bool:
    """True when `kernel` can run here: a CUDA (or ROCm) device, or the interpreter."""
    if mixed(kernel):
        return False
    return interpreted(kernel) or torch.cuda.is_available()


def check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def check_device(name: str, device: torch.device, kernel) -> None:
    """Raise when tensors on `device` cannot go to `kernel` (device, interpreter state)."""
    if mixed(kernel):
        raise RuntimeError(
            "TRITON_INTERPRET changed between `import triton` and the import of eigenwatch's Triton "
            "kernels; set it (or unset it) before triton is first imported, e.g. in the environment "
            "of a fresh process"
        )
    if torch.device(device).type != "cuda" and not interpreted(kernel):
        raise ValueError(
            f"{name}: tensor is on {device}; the Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 set before triton is first imported, for CPU testing)"
        )


def check_backend(name: str, t: torch.Tensor, kernel) -> None:
    check_device(name, t.device, kernel)


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous())")
