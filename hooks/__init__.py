"""Taps: read hidden states where they are computed and turn them into frames.

`plugin` (vLLM entry point) + `_vllm_worker` (vLLM worker internals) +
`_vllm_engine` (an in-process vLLM engine for the offline tools and the demo);
`hf` (transformers models, offline); `windows` (per-request windows -> frames,
both taps); `capture` (token sums for the offline detectors); `frames` (the
frame and its wire form); `export` (bounded queue -> the sidecar's Ingest
stream); `config`, `layers`, `models` (the demo's models). Importing this
package imports nothing heavy: the sidecar reads `frames` without torch.
"""
