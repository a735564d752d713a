"""The long-running sidecar: gRPC server (`server`), per-request state
(`state`), Prometheus metrics (`metrics`), alert policy (`alerts`), live
EigenTrack risk (`risk`) and its settings, declared once (`config`). Imports
numpy, grpcio, prometheus-client and onnxruntime; never torch or vLLM.
"""
