"""Taps: read hidden states where they are computed and turn them into frames.

`vllm_plugin` (entry point) + `_vllm_worker` (vLLM internals, one module),
`hf` (transformers models, offline), `windows` (per-request windows -> frames,
engine-agnostic), `export` (bounded queue -> the sidecar's Ingest stream).
"""
