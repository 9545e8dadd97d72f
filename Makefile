# `make demo`: set up .venv and train + evaluate the demo preset on the embedded data, explain a
# test pair (runs/demo/pair.png) and end with an HTML report: open runs/demo/report/index.html;
# `make serve-demo` explores it.
# `make test`: set up .venv with the dev extras and run the whole test suite (browser tests included
# where /usr/bin/chromium exists); `make test-browser`: the headless-Chromium tests alone.
# `make lint`: ruff (lint and format check) on src, tests and bench, and mypy on src (`make test` runs it too).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# PyTorch first, pinned to the builds these machines serve from local disk; override freely.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

DEMO_CKPT := runs/demo/checkpoints/best.ckpt
# two test images of one class (test class 60, images 0 and 3), as the demo preset draws them
define DEMO_PAIR
from glassmetric.config import load_config
from glassmetric.data.synthetic import SyntheticParts
data = load_config("demo").data
test = SyntheticParts("test", num_classes=data.synthetic.num_classes, images_per_class=data.synthetic.images_per_class, image_size=data.image_size)
for i in (0, 3):
    test.load(i).image.save(f"runs/demo/bird_{i}.png")
endef
export DEMO_PAIR

.PHONY: demo serve-demo test test-browser lint lint-only setup setup-dev clean

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
	$(BIN)/python -c "$$DEMO_PAIR"
	$(BIN)/glassmetric explain runs/demo/bird_0.png runs/demo/bird_3.png --checkpoint $(DEMO_CKPT) -o runs/demo/pair.png
	$(BIN)/glassmetric report --checkpoint $(DEMO_CKPT) -o runs/demo/report --queries 2 --k 0,5,10,50
	@echo "runs/demo/pair.png: why two test birds of one class were judged alike"
	@echo "open runs/demo/report/index.html in a browser; \`make serve-demo\` starts the web explorer"

serve-demo: setup
	$(BIN)/glassmetric serve --checkpoint $(DEMO_CKPT)

# the tests, then the lint; either failing fails `make test`
test: setup-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS); tests=$$?; $(MAKE) --no-print-directory lint-only; lint=$$?; \
	[ $$tests -eq 0 ] && [ $$lint -eq 0 ]

test-browser: setup-dev
	$(BIN)/python -m pytest -m browser $(PYTEST_ARGS)

lint: setup-dev
	$(MAKE) --no-print-directory lint-only

lint-only:
	$(BIN)/ruff check src tests bench && $(BIN)/ruff format --check src tests bench && $(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
