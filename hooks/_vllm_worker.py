"""Everything that touches vLLM worker internals lives here.

`EigenwatchWorkerExtension` is mixed into vLLM's worker class through
`worker_extension_cls`, so its methods are callable by name with
`collective_rpc`. `eigenwatch_install` (called by the plugin right after the
model is loaded, before vLLM compiles it) chooses how rows are captured and
wraps the model runner's `execute_model` for per-step bookkeeping.

Two capture paths (`EIGENWATCH_CAPTURE=auto|aux|hooks`):

- aux (auto, for models with vLLM's EAGLE-3 interface: Llama, Qwen, ...): the
  model returns the residual stream of the tapped layers as extra outputs of
  its compiled (and CUDA-graph-captured) forward — the mechanism EAGLE-3 and
  `extract_hidden_states` use (`set_aux_hidden_state_layers`, the runner's
  `use_aux_hidden_state_outputs`). Nothing of ours runs inside the graph; the
  runner's `_model_forward` is wrapped to read those tensors right after it.
- hooks (every other model, e.g. BERT-style pooling models): forward hooks on
  the chosen decoder layers call one custom op, `eigenwatch::tap_rows`, which
  torch.compile keeps opaque in the graph, so its Python body runs at every
  step under compiled mode. (Under CUDA-graph replay a Python body does not
  run: on GPUs the plugin forces eager mode for these models only.)

Either way the rows of every tapped layer are stashed during the forward and
handed to the windows (hooks/windows.py) in one call per step, after it.

Row attribution: the flattened batch holds each scheduled request's new rows
contiguously, in `input_batch.req_ids` order, at
`query_start_loc[i]:query_start_loc[i+1]`; rows past `num_actual_tokens` are
padding. Prefix-cache hits are never computed, so never seen: frames carry
them as `skipped_tokens` (the request's `num_computed_tokens` when the tap
first sees it).

Capture mode (off by default; one attribute check per step when off):
`eigenwatch_capture(True)` makes the same path also accumulate per tracked
request and tapped layer the token sums of hooks/capture.py, which the offline
`--engine vllm` path reads with `eigenwatch_pop_captured`.
"""

from __future__ import annotations

import logging
import re
import threading
from itertools import compress
from pathlib import Path

import numpy as np
import torch

from .capture import TokenSums
from .config import TapConfig, bad_request_opt, embed_opt, request_opt, resolve_layers
from .embeddings import EmbeddingTap
from .hidden import HiddenStatsTap, load_hidden_calibration
from .export import FrameExporter
from .layers import find_decoder_layers
from .signatures import signature_bank
from .sketches import LayerSketches
from .windows import FrameSeed, WindowTap

log = logging.getLogger("eigenwatch.tap")

# vLLM appends "-" + 8 hex chars to the client's request id (input_processor).
_ENGINE_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def external_request_id(engine_request_id: str) -> str:
    return _ENGINE_SUFFIX.sub("", engine_request_id)


def model_label(model_config) -> str:
    """The `model` label of frames: the served model name when the user gave one,
    else the last component of the model's path or repo id, never a whole
    filesystem path (it would sit in every metric and alert)."""
    served = model_config.served_model_name
    if isinstance(served, (list, tuple)):
        served = served[0] if served else None
    model = str(model_config.model)
    if served and str(served) != model:
        return str(served)
    return Path(model.rstrip("/")).name or model


# The tap this worker process feeds (one per process: TP rank 0 only).
_ACTIVE: "_VllmTap | None" = None
_CALLS: dict[int, torch.Tensor] = {}
# Hooks stay registered for the life of the process: a compiled graph indexes
# the module's hook dict it traced, and removing a hook breaks the next
# forward. Uninstalling makes them inert instead (the op body sees no tap).
# Likewise the aux outputs and the runner's _model_forward wrapper stay (the
# compiled graph returns them); without an active tap they are ignored.
_HOOKED: dict[tuple[int, int], object] = {}
CAPTURE_PATHS = ("auto", "aux", "hooks")


def _aux_support(model, runner) -> str | None:
    """Why the aux-output path cannot be used here, None when it can."""
    if not callable(getattr(model, "set_aux_hidden_state_layers", None)):
        return f"{type(model).__name__} has no EAGLE-3 aux hidden-state outputs"
    if getattr(runner, "_eigenwatch_aux", None) is not None:
        return None  # set up by an earlier install in this process: the graph already returns them
    if getattr(runner, "use_aux_hidden_state_outputs", None) is not False:
        return "the runner already returns aux hidden states (EAGLE-3 speculative decoding)"
    if not callable(getattr(runner, "_model_forward", None)):
        return "the model runner has no _model_forward to read them after"
    try:
        from vllm.distributed import get_pp_group

        if get_pp_group().world_size > 1:
            return "pipeline parallelism (aux outputs travel between stages)"
    except Exception:
        pass  # not initialised: a single process
    return None


def _wrap_model_forward(runner) -> None:
    """Read the tapped layers' aux outputs right after each forward (once per runner)."""
    original = runner._model_forward
    if getattr(original, "__eigenwatch__", False):
        return

    def _model_forward(*args, **kwargs):
        out = original(*args, **kwargs)
        tap = _ACTIVE
        if tap is not None and tap.active and tap.path == "aux" and isinstance(out, tuple) and len(out) == 2:
            try:
                tap.on_aux(out[1])
            except Exception:  # never into vLLM
                tap.hook_errors += 1
                tap._log_once("aux", "eigenwatch: reading the aux outputs failed (skipping; logged once)")
        return out

    _model_forward.__eigenwatch__ = True
    runner._model_forward = _model_forward


@torch.library.custom_op("eigenwatch::tap_rows", mutates_args=("calls",))
def tap_rows(hidden: torch.Tensor, residual: torch.Tensor | None, calls: torch.Tensor, layer: int) -> None:
    """Hand one layer's output rows to the tap. `calls` (a 1-element counter)
    is declared mutated so compilers keep this output-less op in the graph."""
    calls.add_(1)
    tap = _ACTIVE
    if tap is None or not tap.active:
        return
    try:
        tap.on_rows(layer, hidden, residual)
    except Exception:  # never into vLLM
        tap.hook_errors += 1
        tap._log_once(f"hook{layer}", "eigenwatch: tap failed at layer %d (skipping; logged once)", layer)


@tap_rows.register_fake
def _(hidden, residual, calls, layer):
    return None


def _attention_metadata():
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    meta = get_forward_context().attn_metadata
    if isinstance(meta, list):  # micro-batched (DBO): not attributed yet
        return None
    if isinstance(meta, dict):
        for m in meta.values():
            if hasattr(m, "query_start_loc"):
                return m
        return None
    return meta if hasattr(meta, "query_start_loc") else None


def _make_hook(layer_idx: int, calls: torch.Tensor):
    # Traced by torch.compile when present before compilation: keep it to the
    # op call (no Python state, nothing that can raise). The host's output is
    # returned untouched (None).
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            torch.ops.eigenwatch.tap_rows(output, None, calls, layer_idx)
        elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            residual = output[1] if len(output) > 1 and isinstance(output[1], torch.Tensor) else None
            torch.ops.eigenwatch.tap_rows(output[0], residual, calls, layer_idx)
        return None

    return hook


class _VllmTap:
    def __init__(self, worker, cfg: TapConfig):
        self.worker = worker
        self.runner = worker.model_runner
        self.cfg = cfg
        model_cfg = worker.vllm_config.model_config
        self.model_name = cfg.model or model_label(model_cfg)
        self.exporter = FrameExporter(cfg.sidecar, self.model_name, max_batches=cfg.queue_batches,
                                      grams=cfg.spectra_in_sidecar())
        self.pending: list[FrameSeed] = []
        self.windows = WindowTap(cfg.window, cfg.stride, cfg.max_requests, self.pending.append,
                                 proj_dim=cfg.proj_dim or None)
        # Top-direction sketches for the sidecar's drift detector (EIGENWATCH_SKETCH=on); rows stay here.
        self.sketches = LayerSketches(cfg.sketch_every, cfg.sketch_sample) if cfg.sketch == "on" else None
        self.pending_windows: list = []
        self.step = 0
        self.layout: tuple[list[str], list[int], list[tuple[str, int, int]]] | None = None
        self.opted_out: set[str] = set()
        self.hook_errors = 0
        self.bad_options = 0
        self._logged: set[str] = set()
        self.active = True
        # Capture mode: token sums by engine request id (finished ones wait to
        # be popped; the oldest are evicted past max_requests).
        self.capture = False
        self.sums = TokenSums(max_done=cfg.max_requests)

        model = self.runner.get_model() if hasattr(self.runner, "get_model") else self.runner.model
        self.stack_name, stack = find_decoder_layers(model)
        self.layers = resolve_layers(cfg.layers, len(stack))
        self.rows: dict[int, torch.Tensor] = {}  # layer -> this step's rows [N, d] fp32
        self.layer_calls = dict.fromkeys(self.layers, 0)  # forwards that handed us each layer's rows
        # Lexical signatures (hooks/signatures.py): None unless EIGENWATCH_SIGNATURE_LAYER is set.
        self.signatures = signature_bank(cfg, model, self.layers, len(stack), model_cfg, self)
        self.embeds = self._embedding_tap(cfg, len(stack))
        # The combined score's hidden-state statistics (hooks/hidden.py): None without EIGENWATCH_CALIBRATION.
        # A file it cannot use turns only these off (logged, in stats()): the frames still flow.
        self.hidden, self.hidden_error = None, None
        try:
            cal = (load_hidden_calibration(cfg.calibration, self.layers, cfg.window, cfg.stride)
                   if cfg.calibration else None)
            self.hidden = HiddenStatsTap(cal, cfg.max_requests) if cal is not None else None
        except ValueError as exc:
            self.hidden_error = str(exc)
            log.error("eigenwatch: no hidden-state statistics (the live combined score): %s", exc)
        self.hidden_lost = 0  # finished requests whose statistics found no final frame
        self.path, self.path_reason = self._choose_path(model)
        if self.path == "aux":
            # Aux id i+1 is the residual stream after decoder layer i (vLLM's numbering).
            aux = tuple(i + 1 for i in self.layers)
            earlier = getattr(self.runner, "_eigenwatch_aux", None)
            if earlier is None:
                model.set_aux_hidden_state_layers(aux)
                self.runner.use_aux_hidden_state_outputs = True
                self.runner._eigenwatch_aux = aux
            elif earlier != aux:  # a compiled forward keeps the outputs it was traced with
                raise RuntimeError(f"the compiled forward returns layers {[i - 1 for i in earlier]} from an "
                                   f"earlier install, not {list(self.layers)}: restart vLLM to tap other layers")
            _wrap_model_forward(self.runner)
        else:
            self._register_hooks(stack)
        self._original_execute = self.runner.execute_model
        self.runner.execute_model = self._execute_model

    def _embedding_tap(self, cfg: TapConfig, num_layers: int) -> EmbeddingTap | None:
        """EIGENWATCH_EMBEDDINGS resolved against this model; None when off."""
        if cfg.embeddings == "off":
            return None
        if cfg.embeddings == "output":
            if getattr(self.worker.vllm_config.model_config, "runner_type", None) != "pooling":
                raise ValueError("EIGENWATCH_EMBEDDINGS=output needs a model served with the pooling runner "
                                 "(runner='pooling'); for a generative model give a tapped layer's index, one of "
                                 f"{list(self.layers)}")
            return EmbeddingTap("output", cfg.max_requests)
        layer = int(cfg.embeddings)
        at = layer + num_layers if layer < 0 else layer
        if at not in self.layers:
            raise ValueError(f"EIGENWATCH_EMBEDDINGS: layer {layer} is not tapped; accepted: 'output' for a pooling "
                             f"model, or one of the tapped layers {list(self.layers)} (EIGENWATCH_LAYERS)")
        return EmbeddingTap(str(at), cfg.max_requests)

    def _choose_path(self, model) -> tuple[str, str]:
        want = self.cfg.capture
        why_not = _aux_support(model, self.runner)
        if want == "hooks":
            return "hooks", "EIGENWATCH_CAPTURE=hooks"
        if why_not is None:
            return "aux", "the model returns the tapped layers from its compiled forward"
        if want == "aux":
            raise RuntimeError(f"EIGENWATCH_CAPTURE=aux: {why_not}; use auto or hooks")
        return "hooks", why_not

    def _register_hooks(self, stack) -> None:
        self.op_calls: dict[int, torch.Tensor] = {}
        for idx in self.layers:
            layer = stack[idx]
            if type(layer).__name__ == "PPMissingLayer":  # lives on another PP rank
                continue
            # One counter per layer and process: a compiled graph keeps the tensor
            # it traced, so a re-install must hand the hook the same one.
            if idx not in _CALLS:
                _CALLS[idx] = torch.zeros(1, dtype=torch.int64, device=self._device(layer))
            self.op_calls[idx] = _CALLS[idx]
            # id() of a freed layer can come back for another engine's layer in
            # this process (in-process engines, one after another): trust a
            # handle only while it points at this layer's hook dict.
            handle = _HOOKED.get((id(layer), idx))
            ref = getattr(handle, "hooks_dict_ref", None)
            if handle is None or (ref is not None and ref() is not layer._forward_hooks):
                _HOOKED[(id(layer), idx)] = layer.register_forward_hook(_make_hook(idx, _CALLS[idx]))

    # ---- hooks: never raise into vLLM ----------------------------------------------
    def _log_once(self, key: str, msg: str, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.exception(msg, *args)

    @staticmethod
    def _device(layer: torch.nn.Module) -> torch.device:
        for p in layer.parameters():
            return p.device
        return torch.device("cpu")

    def _current_layout(self) -> tuple[list[str], list[int]] | None:
        if self.layout is not None:
            return self.layout
        meta = _attention_metadata()
        if meta is None:  # profiling / dummy runs have no requests
            return None
        req_ids = list(self.runner.input_batch.req_ids)
        qsl_buf = getattr(self.runner, "query_start_loc", None)
        if qsl_buf is not None and hasattr(qsl_buf, "np"):
            bounds = qsl_buf.np[: len(req_ids) + 1].astype(np.int64)
        else:
            bounds = meta.query_start_loc[: len(req_ids) + 1].cpu().numpy().astype(np.int64)
        n_actual = int(getattr(meta, "num_actual_tokens", bounds[-1]))
        bounds = np.minimum(bounds, n_actual)  # rows past num_actual_tokens are padding
        qsl = bounds.tolist()
        # Only requests not seen before need a look (C-level set difference, no
        # per-request Python work on an ordinary step).
        fresh = set(req_ids).difference(self.windows.slot_of, self.opted_out)
        for rid in (r for r in req_ids if r in fresh) if fresh else ():
            state = self.runner.requests.get(rid)
            params = getattr(state, "sampling_params", None) or getattr(state, "pooling_params", None)
            extra = getattr(params, "extra_args", None) or getattr(params, "extra_kwargs", None)
            problem = bad_request_opt(extra)
            if problem is not None:
                self.bad_options += 1
                if "bad_option" not in self._logged:
                    self._logged.add("bad_option")
                    log.warning("eigenwatch: %s (counted in eigenwatch_tap_bad_options_total; logged once)", problem)
            if not request_opt(extra, self.cfg.default):
                self.opted_out.add(rid)
                continue
            skipped = int(getattr(state, "num_computed_tokens", 0) or 0)
            self.windows.begin(rid, skipped, external_request_id(rid))
            if self.embeds is not None and embed_opt(extra, self.cfg.embed_default) and self.windows.tracked(rid):
                self.embeds.want(rid, external_request_id(rid))
        keep = (bounds[1:] > bounds[:-1]) & np.fromiter(map(self.windows.slot_of.__contains__, req_ids), bool,
                                                        len(req_ids))
        at = np.flatnonzero(keep)
        items = list(zip(compress(req_ids, keep.tolist()), bounds[at].tolist(), bounds[at + 1].tolist()))
        self.layout = (req_ids, qsl, items)
        return self.layout

    def on_rows(self, layer_idx: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """hooks path: one layer's output, during the forward (stashed for the step)."""
        layout = self._current_layout()
        if layout is None or not layout[2]:
            return
        if residual is not None and residual.shape != hidden.shape:
            residual = None
        n = layout[1][-1]
        # The residual stream in fp32, a private copy: later layers update their
        # inputs in place (fused add + norm) before the step's rows are read.
        if residual is None:
            self.rows[layer_idx] = hidden[:n].to(torch.float32, copy=True)
        else:
            self.rows[layer_idx] = hidden[:n].float() + residual[:n].float()
        self.layer_calls[layer_idx] += 1

    def on_aux(self, aux: list[torch.Tensor]) -> None:
        """aux path: the tapped layers' residual streams [N_padded, d], in layer order."""
        layout = self._current_layout()
        if layout is None or not layout[2]:
            return
        n = layout[1][-1]
        # Each aux output is its own tensor (hidden + residual, summed by the model),
        # untouched until the next forward: read in place, after this step's forward.
        for layer, t in zip(self.layers, aux):
            self.rows[layer] = t[:n].float()
            self.layer_calls[layer] += 1

    def _flush_rows(self) -> None:
        """After the forward: every tapped layer's rows into the windows, in one call."""
        if not self.rows or self.layout is None:
            self.rows.clear()
            return
        rows, self.rows = self.rows, {}
        items = self.layout[2]
        first_new = len(self.pending)
        self.windows.add_step(rows, items, self.step)
        if self.sketches is not None:
            self._sketch_rows(rows, items)
        if self.signatures is not None:  # guarded inside: a failure counts as a hook error
            self.signatures.add_step(rows, items)
        if self.capture:
            for layer, stream in rows.items():
                self._capture_rows(layer, stream, items)
        if self.hidden is not None:
            try:  # own guard: a failed statistic must not cost the frames of this step
                self.hidden.add_step(rows, items)
                if len(self.pending) > first_new:  # this step's frames carry the running values
                    self.hidden.attach_running(self.pending[first_new:])
            except ValueError as exc:  # the file does not fit this model: off for good, said once
                self.hook_errors += 1
                self.hidden, self.hidden_error = None, str(exc)
                log.error("eigenwatch: hidden-state statistics off: %s", exc)
            except Exception:
                self.hook_errors += 1
                self._log_once("hidden", "eigenwatch: hidden-state statistics failed (logged once)")
        if self.embeds is not None and self.embeds.wanted:
            try:  # own guard: a failed sum must not cost the frames of this step
                self.embeds.add_step(rows, items)
            except Exception:
                self.hook_errors += 1
                self._log_once("embed", "eigenwatch: embedding sum failed (logged once)")

    def _sketch_rows(self, rows: dict[int, torch.Tensor], items: list[tuple[str, int, int]]) -> None:
        # Own guard: a failed sketch must not cost the frames of this step.
        try:
            self.pending_windows.extend(self.sketches.add_step(rows, items))
        except Exception:
            self.hook_errors += 1
            self._log_once("sketch", "eigenwatch: sketch update failed (logged once)")

    def _capture_rows(self, layer_idx: int, stream: torch.Tensor, items: list[tuple[str, int, int]]) -> None:
        # Own guard: a failed capture must not cost the frames of this step.
        try:
            self.sums.add(layer_idx, stream, items)
        except Exception:
            self.hook_errors += 1
            self._log_once(f"capture{layer_idx}", "eigenwatch: capture failed at layer %d (logged once)", layer_idx)

    # ---- capture mode (called between steps, by collective_rpc) ------------------------
    def set_capture(self, enabled: bool) -> None:
        self.capture = bool(enabled)
        if not self.capture:
            self.sums.clear()

    def pop_captured(self, request_ids: list[str]) -> dict[str, dict[int, tuple] | None]:
        """{id: {layer: (rows, sum, scatter)}} for each id (engine or external id)
        whose capture exists, None where it broke; the state is dropped."""
        return self.sums.pop(request_ids, alias=external_request_id)

    # ---- per step ---------------------------------------------------------------------
    def _execute_model(self, scheduler_output, *args, **kwargs):
        if self.active:
            try:
                self._before_step(scheduler_output)
            except Exception:
                self.hook_errors += 1
                self._log_once("before", "eigenwatch: step bookkeeping failed (logged once)")
        output = None
        try:
            output = self._original_execute(scheduler_output, *args, **kwargs)
            return output
        finally:
            if self.active:
                try:
                    self._after_step(output)
                except Exception:
                    self.hook_errors += 1
                    self._log_once("after", "eigenwatch: step flush failed (logged once)")

    def _before_step(self, scheduler_output) -> None:
        self.step += 1
        self.layout = None
        self.rows.clear()
        for rid in scheduler_output.finished_req_ids:
            self.windows.finish(rid, self.step)
            self.opted_out.discard(rid)
            self.sums.finish(rid)
            if self.embeds is not None:
                self.embeds.finish(rid)
        # A preempted request is recomputed from scratch later: its rows would
        # be seen twice. Forget it; it starts over when it is resumed.
        if self.hidden is not None and scheduler_output.finished_req_ids:
            try:  # finished requests' statistics onto their final frames
                self.hidden_lost += self.hidden.before_step(scheduler_output.finished_req_ids, self.pending)
            except Exception:
                self.hook_errors += 1
                self._log_once("hidden-finish", "eigenwatch: hidden-state statistics failed (logged once)")
        for rid in getattr(scheduler_output, "preempted_req_ids", None) or ():
            self.windows.drop(rid)
            if self.hidden is not None:
                self.hidden.drop(rid)
            self.sums.drop(rid)
            if self.embeds is not None:
                self.embeds.drop(rid)
        if self.signatures is not None:  # finished requests' signatures onto their final frames (guarded)
            self.signatures.before_step(scheduler_output, self.pending)

    def _after_step(self, output=None) -> None:
        try:
            self._flush_rows()
            if self.embeds is not None and self.embeds.wanted:
                self.embeds.on_output(output)  # pooling models: the finished requests' embeddings
        finally:
            self.layout = None
        c = self.exporter.counters
        with self.exporter._lock:
            c.hook_errors = self.hook_errors
            c.bad_options = self.bad_options
            c.rows_seen = self.windows.rows_seen
            c.requests_untracked = self.windows.untracked
            c.requests_opted_out = len(self.opted_out)
        if self.pending:
            batch, self.pending[:] = list(self.pending), []
            self.exporter.submit(batch)
        if self.pending_windows:
            done, self.pending_windows = self.pending_windows, []
            self.exporter.submit_sketches(done)
        if self.embeds is not None:
            if self.embeds.done:
                self.exporter.submit_embeddings(self.embeds.take())
            if self.embeds.refused:
                with self.exporter._lock:
                    c.embeddings_dropped += self.embeds.refused
                self.embeds.refused = 0

    def uninstall(self) -> None:
        global _ACTIVE
        self.active = False
        if _ACTIVE is self:
            _ACTIVE = None
        self.runner.execute_model = self._original_execute
        self.set_capture(False)
        self.exporter.close(timeout=2.0)

    def stats(self) -> dict:
        out = self.exporter.stats()
        out.update(
            model=self.model_name,
            layers=list(self.layers),
            stack=self.stack_name,
            tracked_requests=len(self.windows.requests),
            step=self.step,
            capture_path=self.path,
            capture_path_reason=self.path_reason,
            sketch=None if self.sketches is None else self.sketches.stats(),
            signature=None if self.signatures is None else self.signatures.stats(),
            hidden=({"error": self.hidden_error} if self.hidden_error else None) if self.hidden is None else {
                "calibration": self.hidden.cal.path, "id": self.hidden.cal.id,
                "tracked": len(self.hidden.slot_of), "untracked": self.hidden.untracked, "lost": self.hidden_lost},
            embeddings=None if self.embeds is None else {"source": self.cfg.embeddings,
                                                         "waiting": len(self.embeds.wanted)},
            spectra_at="sidecar" if self.exporter.grams else "tap",
            layer_calls=dict(self.layer_calls),
            capture=self.capture,
            captured_requests=len(self.sums),
            captures_evicted=self.sums.evicted,
        )
        return out


_install_lock = threading.Lock()


class EigenwatchWorkerExtension:
    """Mixed into vLLM's worker; every method is reachable by collective_rpc."""

    def eigenwatch_install(self) -> dict:
        with _install_lock:
            existing = getattr(self, "_eigenwatch_tap", None)
            if existing is not None:
                return existing.stats()
            try:
                from vllm.distributed import get_tensor_model_parallel_rank

                if get_tensor_model_parallel_rank() != 0:
                    # The residual stream is the same on every TP rank: rank 0's
                    # frames are the request's, another rank's would be duplicates.
                    self._eigenwatch_not_installed = "TP rank != 0"
                    return {"installed": False, "reason": self._eigenwatch_not_installed}
            except Exception:
                pass  # not initialised: single process
            try:
                tap = _VllmTap(self, TapConfig.from_env())
            except Exception as exc:
                log.exception("eigenwatch: tap not installed")
                self._eigenwatch_not_installed = str(exc)
                return {"installed": False, "reason": str(exc)}
            global _ACTIVE
            _ACTIVE = tap
            self._eigenwatch_tap = tap
            log.info("eigenwatch: tapping %s layers %s -> %s", tap.stack_name, list(tap.layers), tap.cfg.sidecar)
            return {"installed": True, **tap.stats()}

    def eigenwatch_stats(self) -> dict:
        tap = getattr(self, "_eigenwatch_tap", None)
        if tap is None:
            return {"installed": False, "reason": getattr(self, "_eigenwatch_not_installed", "not installed")}
        return {"installed": True, **tap.stats()}

    def eigenwatch_capture(self, enabled: bool) -> bool:
        """Turn capture mode on or off (off drops every captured sum); False
        when this worker has no tap."""
        tap = getattr(self, "_eigenwatch_tap", None)
        if tap is None:
            return False
        tap.set_capture(enabled)
        return True

    def eigenwatch_pop_captured(self, request_ids: list[str]) -> dict:
        """{request id: {layer: (rows, sum [d], scatter [d, d])} or None if its
        capture failed}, float64 numpy, for the ids (engine or client ids) that
        have one; their state is dropped. Arrays need an in-process engine (or
        VLLM_ALLOW_INSECURE_SERIALIZATION=1) to cross collective_rpc intact."""
        tap = getattr(self, "_eigenwatch_tap", None)
        if tap is None:
            return {}
        return tap.pop_captured(list(request_ids))

    def eigenwatch_uninstall(self) -> bool:
        tap = getattr(self, "_eigenwatch_tap", None)
        if tap is None:
            return False
        tap.uninstall()
        self._eigenwatch_tap = None
        return True
