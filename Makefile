# Two commands do all set-up on a fresh clone:
#   make bench   - the benchmark report for this machine (GPU if present, else CPU)
#   make test    - the test suite
# A machine whose python3 already has a CUDA-enabled torch (the GPU machines) builds against it;
# everywhere else a virtualenv (.venv) gets the pinned versions below.
SHELL := /bin/bash
VENV ?= .venv
PINNED := torch==2.13.0 triton==3.6.0 "numpy<2.4" pytest pytest-benchmark pytest-xdist ninja \
          pybind11 matplotlib setuptools wheel
PYTEST_ARGS ?= -q
# pytest-xdist workers for `make test` (a test file stays on one worker: its module fixtures,
# e.g. the emulation builds, run once); TEST_JOBS=0 runs in this process
TEST_JOBS ?= 2
BENCH_ARGS ?=

SYSTEM_CUDA := $(shell python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && echo 1)
ifeq ($(SYSTEM_CUDA),1)
PYTHON := python3
ENV_STAMP := build/.env-system
else
PYTHON := $(abspath $(VENV))/bin/python
ENV_STAMP := $(VENV)/.pinned
endif
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -type f)

.PHONY: test bench microbench env build clean

$(VENV)/.pinned: Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(PINNED)
	touch $@

build/.env-system:
	mkdir -p build
	python3 -m pip install -q pytest pytest-benchmark pytest-xdist ninja pybind11 matplotlib || true
	touch $@

# the editable install compiles litefpn_kernels._C in place
build/.ext: $(ENV_STAMP) $(EXT_SOURCES)
	mkdir -p build
	MAX_JOBS=$${MAX_JOBS:-4} $(PYTHON) -m pip install -q -e . --no-build-isolation
	touch $@

env: $(ENV_STAMP)
build: build/.ext

test: build/.ext
	@LITEFPN_REQUIRE_EXT=1 $(PYTHON) -m pytest tests -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests - treating as a failure"; exit 1; fi; \
	exit $$rc

bench: build/.ext
	$(PYTHON) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf build litefpn_kernels/_C*.so *.egg-info

microbench: build/.ext
	$(PYTHON) -m pytest benchmarks/test_bench_ops.py --benchmark-group-by=param:op,param:pass_ $(PYTEST_ARGS)
