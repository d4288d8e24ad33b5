# Lethe: `make demo` runs the main job end to end; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_FLAGS := --disable-pip-version-check --quiet

.PHONY: install test bench bench-acks demo proto-lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# Reinstall when the project's requirements change. CPU torch is pinned by constraints/cpu.txt.
$(STAMP): $(BIN)/python pyproject.toml constraints/cpu.txt
	$(BIN)/pip install $(PIP_FLAGS) -c constraints/cpu.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m unlearn.bench.sweep

# Trains the digits model, registers it in embedded MLflow, streams 21 erasures through the gRPC API.
demo: $(STAMP)
	$(BIN)/lethe demo

bench-acks: $(STAMP)
	$(BIN)/python -m service.api.bench_acks --json docs/bench_acks.json

proto-lint: $(STAMP)
	$(BIN)/buf lint proto && $(BIN)/buf format --diff --exit-code proto

clean:
	rm -rf $(VENV) .cache .pytest_cache
