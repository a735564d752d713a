"""The tap for Hugging Face transformers models (offline scoring, hosts without
vLLM): forward hooks on the decoder blocks collect each tapped layer's rows,
which then go to the same windows (hooks/windows.py, all layers in one call),
token sums (hooks/capture.py) and, when `sketches` is set, top-direction sketches
(hooks/sketches.py) as the vLLM tap's; one request per forward, rows in token order."""

from __future__ import annotations

import torch

from .capture import Sums, TokenSums
from .config import resolve_layers
from .frames import Frame
from .layers import find_decoder_layers, residual_stream
from .sketches import LayerSketches, SketchWindow
from .windows import FrameSeed, WindowTap, to_frames


class HFTap:
    def __init__(self, model: torch.nn.Module, layers: tuple[int, ...] | None = None, window: int = 32,
                 stride: int = 16, model_name: str = "hf", proj_dim: int | None = None, capture: bool = False):
        self.model = model
        self.model_name = model_name
        self.stack_name, stack = find_decoder_layers(model)
        self.layers = resolve_layers(layers, len(stack))
        self._seeds: list[FrameSeed] = []
        self.windows = WindowTap(window, stride, max_requests=1, emit=self._seeds.append, proj_dim=proj_dim)
        self.sums = TokenSums(max_done=1) if capture else None
        self._current: str | None = None
        self._rows: dict[int, torch.Tensor] = {}  # this forward's rows per tapped layer
        self._handles = [stack[i].register_forward_hook(self._hook(i)) for i in self.layers]
        # Drift calibration (`eigenwatch calibrate`): the live tap's top-direction windows over these rows.
        self.sketches: LayerSketches | None = None
        self.sketch_windows: list[SketchWindow] = []

    def _hook(self, layer_idx: int):
        def hook(module, args, output):
            if self._current is None:
                return None
            hidden = residual_stream(output)
            if hidden is not None:  # [1, T, d] -> [T, d], a private fp32 copy for after the forward
                self._rows[layer_idx] = (hidden[0] if hidden.ndim == 3 else hidden).to(torch.float32, copy=True)
            return None

        return hook

    @torch.inference_mode()
    def run(self, request_id: str, input_ids: list[int]) -> tuple[list[Frame], Sums | None]:
        """One request whose tokens are `input_ids` (prefill only): its frames, and
        with capture its token sums per tapped layer (None if they broke).
        Raises ValueError when a window holds NaN/Inf activations."""
        self._seeds.clear()
        self._rows.clear()
        self.windows.begin(request_id)
        self._current = request_id
        try:
            device = next(self.model.parameters()).device
            ids = torch.tensor([input_ids], device=device)
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
            # Every tapped layer's rows into the windows in one call, as the vLLM tap does.
            items = [(request_id, 0, len(input_ids))]
            self.windows.add_step(self._rows, items, step=0)
            if self.sketches is not None:
                self.sketch_windows.extend(self.sketches.add_step(self._rows, items))
            if self.sums is not None:
                for layer, rows in sorted(self._rows.items()):
                    self.sums.add(layer, rows, items)
        finally:
            self._current = None
            self._rows.clear()
            self.windows.finish(request_id, step=1)
        frames, failed = to_frames(self._seeds, self.model_name)
        self._seeds.clear()
        sums = None
        if self.sums is not None:
            self.sums.finish(request_id)
            sums = self.sums.pop([request_id]).get(request_id)
        if failed:
            raise ValueError(failed[0][1])
        return frames, sums

    def frames(self, request_id: str, input_ids: list[int]) -> list[Frame]:
        return self.run(request_id, input_ids)[0]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
