# The two set-up commands of the README: `make serve` (the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test lint install perf-analyzer chromium grpc-cpp fuzz

$(BIN)/tidal: pyproject.toml CMakeLists.txt $(wildcard protos/*.proto) $(shell find kernels cmake -type f) | grpc-cpp
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -U pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[cpu]'
	touch $@

# The test extra on top (the second editable install reuses the first one's CMake build folder).
$(VENV)/.test-extra: $(BIN)/tidal
	$(BIN)/pip install -q --disable-pip-version-check -e '.[cpu,test]'
	touch $@

install: $(BIN)/tidal

serve: install
	$(BIN)/tidal serve

perf-analyzer:
	bash perf/install-perf-analyzer.sh

# The status page test drives Debian's chromium through playwright (no browser download).
chromium:
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
	  { echo "the status page test needs Debian's chromium: run 'sudo apt-get install chromium'" >&2; exit 1; }

# gRPC C++ for the native front end (`tidal serve --frontend native`), from Debian's packages when run as root;
# elsewhere tidal builds without it and serves through grpcio. gRPC's CMake package also wants its code
# generators (protobuf-compiler-grpc). Order-only: a venv built before these were installed is not rebuilt.
GRPC_CPP := libgrpc++-dev libprotobuf-dev protobuf-compiler-grpc
grpc-cpp:
	@dpkg -s $(GRPC_CPP) >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q $(GRPC_CPP) >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q $(GRPC_CPP) >/dev/null; }; }; } || \
	  echo "note: no gRPC C++ (sudo apt-get install $(GRPC_CPP)); the native front end is not built" >&2

lint: $(VENV)/.test-extra
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: $(VENV)/.test-extra perf-analyzer chromium lint
	$(BIN)/pytest

# Coverage-guided fuzzing with atheris, beside the bounded hypothesis fuzzing that `make test` runs.
FUZZ_SECONDS ?= 60
fuzz: install
	$(BIN)/pip install -q --disable-pip-version-check 'atheris>=2.3'
	$(BIN)/python tests/fuzz/atheris_targets.py request -max_total_time=$(FUZZ_SECONDS)
	$(BIN)/python tests/fuzz/atheris_targets.py pbtxt -max_total_time=$(FUZZ_SECONDS)
