"""Finding a model's block stack and reading a block's output: shared by the
vLLM tap and the transformers tap (no vLLM imports here)."""

from __future__ import annotations

import torch


def find_decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's stack of blocks: the longest nn.ModuleList (model.layers for
    Llama-likes, encoder.layer for BERT-likes)."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise RuntimeError(
            f"eigenwatch: found no nn.ModuleList of blocks in {type(model).__name__}; "
            "set EIGENWATCH_LAYERS only for models with a layer stack"
        )
    return best


def residual_stream(output) -> torch.Tensor | None:
    """A decoder layer's output as one [tokens, d] tensor. vLLM's Llama-style
    layers return (hidden, residual) with the residual add deferred to the next
    norm: the stream is their sum."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        hidden = output[0]
        if len(output) > 1 and isinstance(output[1], torch.Tensor) and output[1].shape == hidden.shape:
            return hidden + output[1]
        return hidden
    return None
