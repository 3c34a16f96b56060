# `make test` and `make demo` each set up .venv on their own, on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch: an unpinned torch would pull a multi-GB CUDA build. On a GPU
# machine with CUDA, `make test TORCH=torch` takes PyPI's default (CUDA) build instead.
TORCH ?= torch==2.13.0

.PHONY: setup test lint demo bench bench-setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	touch $@

setup: $(VENV)/.installed

test: setup lint
	$(PY) -m pytest -q

# ruff (pyflakes, pycodestyle, isort, pyupgrade, bugbear) and the layers contract
# (import-linter, pyproject.toml): a lower layer never imports a higher one.
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

demo: setup
	$(VENV)/bin/scratchlm demo

# The peers the benchmarks compare against. llms-from-scratch goes in with --no-deps:
# its declared dependencies pull TensorFlow, and the modules we use need only torch.
bench-setup: setup
	$(PY) -m pip install -q -e ".[dev,bench]" "$(TORCH)"
	$(PY) -m pip install -q --no-deps llms-from-scratch
	# llama.cpp for benchmarks/decode.py (GGUF files written with gguf's writer); builds from source.
	$(PY) -m pip install -q gguf llama-cpp-python

bench: bench-setup
	$(PY) benchmarks/bpe_train.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/kv_cache.py
	$(PY) benchmarks/finetune.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/rag.py
	$(PY) benchmarks/eval.py

clean:
	rm -rf $(VENV) runs
