# The two set-up commands of the README: `make serve` (the demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test lint install perf-analyzer fuzz

$(BIN)/tidal: pyproject.toml CMakeLists.txt $(wildcard protos/*.proto) $(wildcard kernels/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -U pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(BIN)/tidal

serve: install
	$(BIN)/tidal serve

perf-analyzer:
	bash perf/install-perf-analyzer.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: install perf-analyzer lint
	$(BIN)/pytest

# Coverage-guided fuzzing with atheris, beside the bounded hypothesis fuzzing that `make test` runs.
FUZZ_SECONDS ?= 60
fuzz: install
	$(BIN)/pip install -q --disable-pip-version-check 'atheris>=2.3'
	$(BIN)/python tests/fuzz/atheris_targets.py request -max_total_time=$(FUZZ_SECONDS)
	$(BIN)/python tests/fuzz/atheris_targets.py pbtxt -max_total_time=$(FUZZ_SECONDS)
