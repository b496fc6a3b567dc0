# jaxprune: `make demo` and `make test` set up everything they need.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export JAXPRUNE_CACHE ?= $(HOME)/.cache/jaxprune
# XLA's persistent compilation cache: the second run of a test or the demo skips most compiles.
export JAX_COMPILATION_CACHE_DIR ?= $(JAXPRUNE_CACHE)/xla-cache
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)

.PHONY: setup fixtures demo demo-quick test test-fast bench clean

setup: $(STAMP) fixtures

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (jaxprune needs Python 3.11)" >&2; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch: the CPU build (2.13.0) — a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,eval]'
	# llama.cpp (CPU) for the GGUF tests and 4-bit export: --no-deps, see pyproject.toml's test extra.
	$(BIN)/python -m pip install -q --no-deps llama-cpp-cffi==0.4.42
	# PEFT, the independent reference of tests/test_adapters.py (DoRA, RandLoRA): --no-deps, its requirements
	# (torch, transformers, accelerate, safetensors, huggingface_hub, psutil, tqdm, pyyaml) are installed above.
	$(BIN)/python -m pip install -q --no-deps peft==0.21.0
	rm -f $(VENV)/.installed-*; touch $@

fixtures: $(STAMP)
	$(BIN)/python scripts/fixtures.py

demo: setup
	$(BIN)/python scripts/demo.py

demo-quick: setup
	$(BIN)/python scripts/demo.py --quick

test: setup
	$(BIN)/python -m pytest -x -q -n 2 --dist loadfile --durations=15 tests

test-fast: setup
	$(BIN)/python -m pytest -x -q -n 2 --dist loadfile -m "not slow" tests

bench: setup
	$(BIN)/python scripts/bench_forward.py
	$(BIN)/python scripts/bench_memory.py
	$(BIN)/python scripts/bench_pruning_memory.py
	$(BIN)/python scripts/make_benchmarks_md.py

clean:
	rm -rf $(VENV) .pytest_cache
