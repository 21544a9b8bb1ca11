# The two commands of the README: `make demo` (the main job) and `make test`.
# Each installs what it needs: a virtualenv with torch 2.13.0 (CPU build) and
# the project's extras, plus the Debian packages the tests drive (mosquitto,
# chromium) when run as root on Debian.

VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install system-deps demo lint test test-slow test-all test-gpu clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages for the broker and browser tests; skipped when present.
system-deps:
	@need=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need="$$need mosquitto"; \
	command -v mosquitto_pub >/dev/null 2>&1 || need="$$need mosquitto-clients"; \
	command -v chromium >/dev/null 2>&1 || need="$$need chromium"; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$$need postgresql"; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$need"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	  else echo "warning: missing$$need (apt-get install$$need); their tests will skip"; fi; \
	fi

demo: $(STAMP) system-deps
	$(VENV)/bin/toolchain demo

# ruff (pycodestyle, pyflakes, import order, bugbear) on everything; mypy on the foundation, targets,
# calibration and the device side (pyproject.toml's [tool.ruff] and [tool.mypy])
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(STAMP) system-deps lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP) system-deps
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

test-all: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# On a machine with an NVIDIA GPU: a venv of its own (torch 2.13.0, a CUDA build there; TensorRT's
# tensorrt-cu12 wheels, onnxruntime-gpu in place of the CPU build, cuda-python), then the TensorRT contract
# tests (engine built from the bundle's recipe, INT8 calibration cache, accuracy gate on the real engine) and
# the CUDA training smoke test. Elsewhere every one of them skips, saying what it needs.
GPU_VENV ?= .venv-gpu
ORT_VERSION = $(shell $(PY) -c "import onnxruntime; print(onnxruntime.__version__)" 2>/dev/null)

test-gpu: $(STAMP) system-deps
	test -x $(GPU_VENV)/bin/python || python3 -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q torch==2.13.0
	$(GPU_VENV)/bin/python -m pip install -q -e '.[all,dev,tensorrt]'
	$(GPU_VENV)/bin/python -m pip uninstall -q -y onnxruntime
	$(GPU_VENV)/bin/python -m pip install -q onnxruntime-gpu$(if $(ORT_VERSION),==$(ORT_VERSION))
	$(GPU_VENV)/bin/python -c "import torch, tensorrt; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'tensorrt', tensorrt.__version__)"
	$(GPU_VENV)/bin/python -m pytest -m "gpu or tensorrt" tests/targets/test_jetson.py tests/toolchain/test_gpu.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(GPU_VENV) runs demo_out .pytest_cache
