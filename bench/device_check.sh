#!/usr/bin/env bash
# The GPU checks, as one device run (H100/H200): the window-spectra kernels,
# compiled on CUDA against float64 references, their GPU table, the tap's cost
# per CUDA-graph decode step with and without the live statistics (bench_decode_gpu.py), the Sparton GPU cases and
# the live hidden-state statistics' RowSqdist (bench_hidden.py).
#
# The device machine has torch, triton and numpy but no pytest; carry its
# wheels (run once here, in the repo root):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       -d .whl pytest iniconfig pluggy packaging
# then: run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=420)
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== Triton kernels compiled on CUDA vs float64 references"
EW_TRITON_DEVICE=cuda timeout 240 python3 tests/test_triton_spectra.py
echo "== bench/bench_spectra.py"
timeout 240 python3 bench/bench_spectra.py --repeats 3
echo "== bench/bench_decode_gpu.py (the tap's cost per decode step, CUDA graphs on)"
timeout 300 python3 bench/bench_decode_gpu.py
echo "== bench/bench_sparton.py (GPU cases)"
timeout 240 python3 bench/bench_sparton.py --rounds 5
echo "== bench/bench_hidden.py (the live statistics' RowSqdist on CUDA against float64; p = 4096 as an 8B model)"
timeout 120 python3 bench/bench_hidden.py --device cuda --p 4096,384 --rows 64,4096 --repeats 10
