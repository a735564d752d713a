"""The tap for Hugging Face transformers models (offline scoring, hosts without
vLLM): forward hooks on the decoder blocks collect each tapped layer's rows,
which then go to the same windows (hooks/windows.py, all layers in one call),
token sums (hooks/capture.py) and, when `sketches` is set, top-direction sketches
(hooks/sketches.py) as the vLLM tap's; several texts per forward (padded,
masked), each text's rows in token order."""

from __future__ import annotations

import torch

from .capture import Sums, TokenSums
from .config import resolve_layers
from .frames import Frame
from .layers import find_decoder_layers, residual_stream
from .sketches import LayerSketches, SketchWindow
from .windows import FrameSeed, WindowTap, to_frames


class HFTap:
    """`run_batch` takes several texts per forward (right-padded, masked): every
    text's rows are its own, as in a forward of its own, up to fp32 rounding of
    the batched matmuls; the windows, sums and sketches then see the texts one
    after another, in the order given, as the vLLM tap sees a step's requests."""

    def __init__(self, model: torch.nn.Module, layers: tuple[int, ...] | None = None, window: int = 32,
                 stride: int = 16, model_name: str = "hf", proj_dim: int | None = None, capture: bool = False,
                 max_batch: int = 1):
        self.model = model
        self.model_name = model_name
        self.max_batch = max_batch
        self.stack_name, stack = find_decoder_layers(model)
        self.layers = resolve_layers(layers, len(stack))
        self._seeds: list[FrameSeed] = []
        self.windows = WindowTap(window, stride, max_requests=max_batch, emit=self._seeds.append,
                                 proj_dim=proj_dim)
        self.sums = TokenSums(max_done=max_batch) if capture else None
        self._active = False
        self._rows: dict[int, torch.Tensor] = {}  # this forward's rows per tapped layer, [B, T, d]
        self._handles = [stack[i].register_forward_hook(self._hook(i)) for i in self.layers]
        # Drift calibration (`eigenwatch calibrate`): the live tap's top-direction windows over these rows.
        self.sketches: LayerSketches | None = None
        self.sketch_windows: list[SketchWindow] = []
        # Offline detectors that read single tokens (monitor/transition.py): when set,
        # called once per text after its forward with {layer: its rows [n, d], fp32, CPU}.
        self.row_sink = None

    def _hook(self, layer_idx: int):
        def hook(module, args, output):
            if not self._active:
                return None
            hidden = residual_stream(output)
            if hidden is not None:  # [B, T, d] (or [T, d]): a private fp32 copy for after the forward
                self._rows[layer_idx] = (hidden if hidden.ndim == 3 else hidden[None]).to(torch.float32, copy=True)
            return None

        return hook

    @torch.inference_mode()
    def run_batch(self, texts: list[tuple[str, list[int]]]) -> list[tuple[str, list[Frame], Sums | None, str | None]]:
        """Texts (id, token ids), at most max_batch, prefill only, in one forward:
        per text (id, frames, sums or None if they broke, None or why the text
        gave nothing usable, e.g. a window of NaN/Inf activations)."""
        if not texts:
            return []
        if len(texts) > self.max_batch:
            raise ValueError(f"texts: {len(texts)} in one batch, over max_batch {self.max_batch}")
        self._seeds.clear()
        self._rows.clear()
        lengths = [len(ids) for _, ids in texts]
        for rid, _ in texts:
            self.windows.begin(rid)
        self._active = True
        try:
            device = next(self.model.parameters()).device
            ids = torch.zeros((len(texts), max(lengths)), dtype=torch.long, device=device)  # [B, T], right-padded
            mask = torch.zeros_like(ids)
            for b, (_, tok) in enumerate(texts):
                ids[b, : len(tok)] = torch.tensor(tok, dtype=torch.long)
                mask[b, : len(tok)] = 1
            self.model(input_ids=ids, attention_mask=mask)
            self._active = False
            # The texts' own rows, one after another: [N, d] per layer, and (id, lo, hi) items.
            bounds = [0]
            for n in lengths:
                bounds.append(bounds[-1] + n)
            items = [(rid, bounds[b], bounds[b + 1]) for b, (rid, _) in enumerate(texts)]
            rows = {layer: torch.cat([h[b, :n] for b, n in enumerate(lengths)]) if len(texts) > 1 else h[0, : lengths[0]]
                    for layer, h in self._rows.items()}
            # Every tapped layer's rows into the windows in one call, as the vLLM tap does.
            self.windows.add_step(rows, items, step=0)
            if self.sketches is not None:
                self.sketch_windows.extend(self.sketches.add_step(rows, items))
            if self.sums is not None:
                for layer, stream in sorted(rows.items()):
                    self.sums.add(layer, stream, items)
            if self.row_sink is not None:
                for rid, lo, hi in items:
                    self.row_sink(rid, {layer: stream[lo:hi].cpu() for layer, stream in rows.items()})
        finally:
            self._active = False
            self._rows.clear()
            for rid, _ in texts:
                self.windows.finish(rid, step=1)
        frames, failed = to_frames(self._seeds, self.model_name)  # one batched eigensolve for the whole batch
        self._seeds.clear()
        why = {}
        for seed, reason in failed:
            why.setdefault(seed.request_id, reason)
        by_text: dict[str, list[Frame]] = {rid: [] for rid, _ in texts}
        for f in frames:
            by_text[f.request_id].append(f)
        sums = {}
        if self.sums is not None:
            for rid, _ in texts:
                self.sums.finish(rid)
            sums = self.sums.pop([rid for rid, _ in texts])
        return [(rid, by_text[rid], sums.get(rid), why.get(rid)) for rid, _ in texts]

    def run(self, request_id: str, input_ids: list[int]) -> tuple[list[Frame], Sums | None]:
        """One request whose tokens are `input_ids` (prefill only): its frames, and
        with capture its token sums per tapped layer (None if they broke).
        Raises ValueError when a window holds NaN/Inf activations."""
        ((_, frames, sums, why),) = self.run_batch([(request_id, list(input_ids))])
        if why is not None:
            raise ValueError(why)
        return frames, sums

    def frames(self, request_id: str, input_ids: list[int]) -> list[Frame]:
        return self.run(request_id, input_ids)[0]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
