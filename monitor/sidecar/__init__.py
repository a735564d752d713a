"""The long-running sidecar: gRPC server (`server`), per-request state
(`state`), Prometheus metrics (`metrics`), alert policy (`alerts`), live
EigenTrack risk (`risk`), EigenShield's Filter service (`shield_service`) and
their settings, declared once (`config`). Imports
numpy, grpcio, prometheus-client and onnxruntime; never torch or vLLM.
"""
