"""vLLM `general_plugins` entry point (runs in every vLLM process, before any model).

Does nothing unless EIGENWATCH_ENABLE=1 (and EIGENWATCH_DISABLE is not set).
When enabled it
  1. sets `worker_extension_cls` on the engine config (EngineArgs), which mixes
     `EigenwatchWorkerExtension` into the worker. The tap's hooks call a custom
     op that torch.compile keeps in the graph, so compiled mode stays on; on
     platforms with CUDA graphs (whose replay skips the op's Python body) it
     forces eager mode;
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
                    log.warning(
                        "eigenwatch: forcing enforce_eager=True: CUDA-graph replay skips the tap's "
                        "Python body; set EIGENWATCH_DISABLE=1 to serve untapped"
                    )
                    self.enforce_eager = True
        return original(self, *args, **kwargs)

    create_engine_config.__eigenwatch__ = True
    EngineArgs.create_engine_config = create_engine_config


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
