"""The monitor: detectors, the calibration file, the sidecar, the offline tools, the CLI.

At the top, what both lifecycles share: one module per detector
(`spectral_spike`, `eigentrack`, `mahalanobis`, `llmcheck`, `combined`) and the
calibration file's one owner (`calibration`). `sidecar/` is the long-running
gRPC server, `offline/` the commands that run a model over texts, `cli/` the
command line. The sidecar needs only numpy, grpcio, prometheus-client and
onnxruntime: never torch or vLLM (commands that need a model import the taps
lazily, inside the command).
"""
