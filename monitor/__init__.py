"""The sidecar: gRPC server, detectors, alerts, Prometheus metrics, CLI.

Needs only numpy, grpcio and prometheus-client: never imports torch or vLLM
(commands that need a model import the taps lazily, inside the command).
"""
