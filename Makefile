# `make demo`: set up .venv and train + evaluate the demo preset on the embedded data.
# `make test`: set up .venv with the dev extras and run the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# PyTorch first, pinned to the builds these machines serve from local disk; override freely.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test test-slow setup setup-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH_SPEC)
	touch $@

$(VENV)/.setup: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[weights]"
	touch $@

$(VENV)/.setup-dev: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[weights,dev,export]"
	touch $@ $(VENV)/.setup

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

demo: setup
	$(BIN)/glassmetric fit --config demo --baseline --overwrite

test: setup-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# exit status 5 means no test is marked slow (yet): not a failure
test-slow: setup-dev
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) runs .pytest_cache
