# Lethe: `make demo` runs the main job end to end; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_FLAGS := --disable-pip-version-check --quiet

.PHONY: install test bench bench-vit bench-lm bench-acks demo proto-lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# Reinstall when the project's requirements change. CPU torch is pinned by constraints/cpu.txt.
$(STAMP): $(BIN)/python pyproject.toml constraints/cpu.txt
	$(BIN)/pip install $(PIP_FLAGS) -c constraints/cpu.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Every classifier method against retrain-from-scratch on the digits scenarios, seeds 0-2 (docs/benchmarks.md).
bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m unlearn.bench.sweep

# GS-LoRA++ continual class forgetting on the ViT (docs/results/gslora.md).
bench-vit: $(STAMP)
	for seed in 0 1 2; do OMP_NUM_THREADS=1 $(BIN)/python -m unlearn.bench --method gslora++ \
	  --scenario digits-vit-continual --seed $$seed --json | tail -n 1; done

# Language-model unlearning on fictitious people (docs/results/lm.md): simnpo+rt, the first method of the
# causal-LM chain, with its defaults, seeds 0-4; each seed retrains the retain-only GPT in process (the
# speed-up's denominator: 3-10 minutes per seed on the loaded 2-core machine), plus 5-15 minutes per original
# GPT not cached yet. The numbers in docs/results/lm.md come from unlearn.bench.lm_sweep, not from this target.
bench-lm: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m unlearn.bench --method simnpo+rt --scenario fictitious-subjects \
	  --seeds 0,1,2,3,4 --json | tail -n 1

# Trains the digits CNN and a tiny GPT, registers both in embedded MLflow, streams 22 erasures through gRPC.
demo: $(STAMP)
	$(BIN)/lethe demo

bench-acks: $(STAMP)
	$(BIN)/python -m service.api.bench_acks --json docs/bench_acks.json

proto-lint: $(STAMP)
	$(BIN)/buf lint proto && $(BIN)/buf format --diff --exit-code proto

clean:
	rm -rf $(VENV) .cache .pytest_cache
