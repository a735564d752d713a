"""vLLM `general_plugins` entry point (runs in every vLLM process, before any model).

Does nothing unless EIGENWATCH_ENABLE=1 (and EIGENWATCH_DISABLE is not set).
When enabled it
  1. sets `worker_extension_cls` on the engine config (EngineArgs), which mixes
     `EigenwatchWorkerExtension` into the worker. Models with vLLM's EAGLE-3
     interface return the tapped layers from their compiled, CUDA-graph-captured
     forward (the aux-output path), so vLLM's compilation and CUDA-graph
     settings stay as the user set them. Other models are tapped by forward
     hooks calling a custom op that torch.compile keeps in the graph: compiled
     mode stays on, but on platforms with CUDA graphs (whose replay skips the
     op's Python body) eager mode is forced for them, with a warning;
  2. after the executor has loaded the model, asks every worker to install
     the tap (`collective_rpc("eigenwatch_install")`); only TP rank 0 taps.
No vLLM internals are touched here beyond those two seams; the rest lives in
`_vllm_worker`.
"""

from __future__ import annotations

import functools
import logging

from .config import enabled

log = logging.getLogger("eigenwatch.plugin")

EXTENSION = "eigenwatch.hooks._vllm_worker.EigenwatchWorkerExtension"
_patched = False


def register() -> None:
    global _patched
    if _patched or not enabled():
        return
    try:
        _patch_engine_args()
        _patch_executor()
        _patched = True
    except Exception:  # a broken tap must never stop vLLM from serving
        log.exception("eigenwatch: could not install the vLLM plugin; serving without the tap")


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "__eigenwatch__", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        if enabled():
            current = getattr(self, "worker_extension_cls", "")
            if current and current != EXTENSION:
                log.error(
                    "eigenwatch: worker_extension_cls is already %r; the tap needs %r. "
                    "Serving without the tap.", current, EXTENSION,
                )
            else:
                self.worker_extension_cls = EXTENSION
                if not self.enforce_eager and _has_cuda_graphs():
                    why = _hooks_needed(self)
                    if why:
                        log.warning(
                            "eigenwatch: forcing enforce_eager=True: the tap needs forward hooks for this model "
                            "(%s), and CUDA-graph replay skips their Python body; set EIGENWATCH_DISABLE=1 to "
                            "serve untapped", why,
                        )
                        self.enforce_eager = True
        return original(self, *args, **kwargs)

    create_engine_config.__eigenwatch__ = True
    EngineArgs.create_engine_config = create_engine_config


def _hooks_needed(engine_args) -> str | None:
    """Why this model cannot use the aux-output path (None when it can): the same
    conditions the worker checks once the model exists (hooks/_vllm_worker.py)."""
    import os

    if os.environ.get("EIGENWATCH_CAPTURE", "").strip().lower() == "hooks":
        return "EIGENWATCH_CAPTURE=hooks"
    if getattr(engine_args, "pipeline_parallel_size", 1) > 1:
        return "pipeline parallelism"
    if getattr(engine_args, "speculative_config", None):
        return "speculative decoding owns the aux outputs"
    try:
        from vllm.model_executor.models import ModelRegistry
        from vllm.model_executor.models.interfaces import supports_eagle3

        model_config = engine_args.create_model_config()
        cls, _ = ModelRegistry.resolve_model_cls(model_config.architectures, model_config)
    except Exception as exc:  # cannot tell: the safe choice
        return f"could not resolve the model class ({exc})"
    if not supports_eagle3(cls):
        return f"{cls.__name__} has no EAGLE-3 aux hidden-state outputs"
    return None


def _has_cuda_graphs() -> bool:
    from vllm.platforms import current_platform

    # CPU (and any platform without graph capture) runs torch.compile's output
    # directly: the op's Python body runs every step.
    return not current_platform.is_cpu()


def _patch_executor() -> None:
    from vllm.v1.executor.abstract import Executor

    original = Executor.__init__
    if getattr(original, "__eigenwatch__", False):
        return

    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        if vllm_config.parallel_config.worker_extension_cls != EXTENSION:
            return
        try:
            self.collective_rpc("eigenwatch_install")
        except Exception:
            log.exception("eigenwatch: installing the tap failed; serving without it")

    __init__.__eigenwatch__ = True
    Executor.__init__ = __init__
