"""The tap for Hugging Face transformers models (offline scoring, GPU hosts
without vLLM). Same windows, same frames as the vLLM tap: forward hooks on the
decoder blocks, rows in token order, one request per forward."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from eigenwatch.hooks.layers import find_decoder_layers, residual_stream
from eigenwatch.hooks.config import resolve_layers
from eigenwatch.hooks.windows import Frame, FrameSeed, WindowTap, finalize


class HFTap:
    def __init__(self, model: torch.nn.Module, layers: tuple[int, ...] | None = None,
                 window: int = 32, stride: int = 16, model_name: str = "hf"):
        self.model = model
        self.model_name = model_name
        self.stack_name, stack = find_decoder_layers(model)
        self.layers = resolve_layers(layers, len(stack))
        self._seeds: list[FrameSeed] = []
        self.windows = WindowTap(window, stride, max_requests=1, emit=self._seeds.append)
        self._current: str | None = None
        self._handles = [stack[i].register_forward_hook(self._hook(i)) for i in self.layers]

    def _hook(self, layer_idx: int):
        def hook(module, args, output):
            if self._current is None:
                return None
            hidden = residual_stream(output)
            if hidden is not None:
                rows = hidden[0] if hidden.ndim == 3 else hidden  # [1, T, d] -> [T, d]
                self.windows.add_rows(self._current, layer_idx, rows, step=0)
            return None

        return hook

    @torch.inference_mode()
    def frames(self, request_id: str, input_ids: list[int]) -> list[Frame]:
        """All frames of one request whose tokens are `input_ids` (prefill only)."""
        self._seeds.clear()
        self.windows.begin(request_id)
        self._current = request_id
        try:
            device = next(self.model.parameters()).device
            ids = torch.tensor([input_ids], device=device)
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            self._current = None
        self.windows.finish(request_id, step=1)
        return [finalize(s, self.model_name) for s in self._seeds]

    def frames_for_texts(self, tokenizer, items: Iterable[tuple[str, str]], max_length: int | None = None):
        for rid, text in items:
            ids = tokenizer(text, truncation=max_length is not None, max_length=max_length)["input_ids"]
            yield rid, self.frames(rid, ids)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
