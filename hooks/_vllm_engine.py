"""vLLM's engine in this process, with the eigenwatch tap: start, run, stop.
The one place the offline tools (`--engine vllm`) and the demo touch vLLM's
Python API (hooks/_vllm_worker.py holds the worker internals).

Code that creates an `Engine` must run under `if __name__ == "__main__":`
(vLLM may spawn worker processes). Settings reach the plugin and the worker
through the environment, which the engine sets for its lifetime and restores
on `close()`.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

from .plugin import register as register_plugin

# Tasks a pooling model may support, in the order the offline tools prefer.
_POOLING_TASKS = ("embed", "token_embed", "classify", "score")


class EngineError(RuntimeError):
    """vLLM could not start or run the model; the message says why."""


@dataclass
class Output:
    request_id: str  # vLLM's id for the request (the tap's frames carry it)
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens ([] for pooling)


def _set_env(env: dict[str, str | None]) -> dict[str, str | None]:
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return saved


class Engine:
    """One `vllm.LLM` with the tap. `tap_env`: EIGENWATCH_* settings (the plugin
    is enabled regardless); `in_process`: the worker runs in this process, so
    collective_rpc returns the tap's numpy arrays as they are (capture mode)."""

    def __init__(self, model_path: str | Path, runner: str = "generate", *, tap_env: dict[str, str] | None = None,
                 in_process: bool = False, max_model_len: int | None = None, **llm_args):
        env: dict[str, str | None] = {"EIGENWATCH_ENABLE": "1", "EIGENWATCH_DISABLE": None}
        env.update(tap_env or {})
        if in_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; CPU only, ignored on GPUs
        self._saved = _set_env(env)
        self.llm = None
        try:
            from vllm import LLM
            from transformers import AutoConfig

            # vLLM loads plugins once per process: maybe before the env said "enable".
            register_plugin()
            maxpos = getattr(AutoConfig.from_pretrained(str(model_path)), "max_position_embeddings", None)
            if max_model_len and maxpos and max_model_len > maxpos:
                # Prefill-only runs need room for one sampled token whose position is never computed.
                self._saved.update(_set_env({"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}))
            kwargs = dict(model=str(model_path), tokenizer=str(model_path), seed=0, **llm_args)
            if max_model_len is not None:
                kwargs["max_model_len"] = max_model_len
            if runner == "pooling":
                kwargs["runner"] = "pooling"
            try:
                self.llm = LLM(**kwargs)
            except Exception as exc:
                raise EngineError(f"vLLM could not start {model_path}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        self.runner = runner
        self.in_process = in_process

    # ---- the model -------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    @property
    def max_model_len(self) -> int:
        return int(self.llm.llm_engine.vllm_config.model_config.max_model_len)

    def pooling_task(self) -> str:
        tasks = tuple(getattr(self.llm, "supported_tasks", ()) or ())
        task = next((t for t in _POOLING_TASKS if t in tasks), None)
        if task is None:
            raise EngineError(f"the model supports none of vLLM's pooling tasks {_POOLING_TASKS} (has {tasks})")
        return task

    def prefill(self, prompts: list[list[int]]) -> list[str]:
        """Run token-id prompts through the model once (generate models: prefill and
        one sampled token, whose row is never computed; pooling models: one pass)
        and return vLLM's request ids, in order. The tap has then emitted every
        frame of these requests, final ones included."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        if self.runner == "pooling":
            outs = self.llm.encode(inputs, pooling_task=self.pooling_task(), use_tqdm=False)
        else:
            params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
            outs = self.llm.generate(inputs, params, use_tqdm=False)
        self._bookkeeping_step()
        return [str(o.request_id) for o in outs]

    def generate(self, prompts: list, max_tokens: int, *, ignore_eos: bool = True,
                 extra_args: list[dict | None] | None = None) -> list[Output]:
        """Greedy generation (generate models) of text prompts or token-id lists;
        extra_args: per-request SamplingParams.extra_args (e.g. {"eigenwatch": "off"})."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
        extra = extra_args or [None] * len(inputs)
        sp = [SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos, extra_args=e)
              for e in extra]
        outs = self.llm.generate(inputs, sp, use_tqdm=False)
        self._bookkeeping_step()
        return [Output(str(o.request_id), list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]

    def embed(self, texts: list[str]) -> list[Output]:
        """Embeddings of text prompts (pooling models), truncated to the model's context."""
        from vllm.inputs import TokensPrompt

        tok, limit = self.tokenizer, self.max_model_len
        inputs = [TokensPrompt(prompt_token_ids=tok(t, truncation=True, max_length=limit)["input_ids"]) for t in texts]
        outs = self.llm.embed(inputs, use_tqdm=False)
        self._bookkeeping_step()
        return [Output(str(o.request_id), list(o.prompt_token_ids), []) for o in outs]

    def _bookkeeping_step(self) -> None:
        # The tap closes a request (its final frames) when the worker hears it
        # finished: in the step after its last. An in-process engine stops
        # stepping once every output is done, so run that one step here (a
        # separate engine process keeps stepping by itself).
        if self.in_process:
            self.llm.llm_engine.step()

    # ---- the tap (worker extension methods, hooks/_vllm_worker.py) ---------------------
    def tap_stats(self) -> dict:
        for st in self.llm.collective_rpc("eigenwatch_stats"):
            if st.get("installed"):
                return st
        return {"installed": False}

    def set_capture(self, enabled: bool) -> bool:
        return any(self.llm.collective_rpc("eigenwatch_capture", args=(bool(enabled),)))

    def pop_captured(self, request_ids: list[str]) -> dict:
        out: dict = {}
        for part in self.llm.collective_rpc("eigenwatch_pop_captured", args=(list(request_ids),)):
            out.update(part or {})
        return out

    # ---- lifetime --------------------------------------------------------------------
    def close(self) -> list[str]:
        """Stop the engine and restore the environment; returns warnings (never raises)."""
        warnings = []
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.collective_rpc("eigenwatch_uninstall")
            except Exception as exc:
                warnings.append(f"uninstalling the tap failed: {exc}")
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as exc:
                warnings.append(f"engine shutdown failed: {exc}")
            del llm
            gc.collect()
            gc.unfreeze()  # vLLM froze this process's heap at engine start
        try:
            import vllm.envs

            vllm.envs.disable_envs_cache()  # an in-process engine cached our settings
        except Exception as exc:
            warnings.append(f"could not reset vLLM's environment cache: {exc}")
        if self._saved:
            _set_env(self._saved)
            self._saved = {}
        return warnings

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
