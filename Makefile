# `make demo`: set up .venv and train + evaluate the demo preset on the embedded data, explain a
# test pair (runs/demo/pair.png) and end with an HTML report: open runs/demo/report/index.html;
# `make serve-demo` explores it.
# `make test`: set up .venv with the dev extras and run the whole test suite (browser tests included
# where /usr/bin/chromium exists); `make test-browser`: the headless-Chromium tests alone.
# `make docs-figures`: regenerate the explanation figures in docs/ (trains the demo checkpoints it lacks
# under runs/docs; `make docs-figures CUB=/data/CUB_200_2011` adds the birds_* figures).
# `make test-lowest`: a second venv (.venv-lowest) at the lowest versions pyproject.toml allows of
# lightning, timm and pytorch-metric-learning (torch as TORCH_SPEC) runs a fast subset of the tests.
# `make lint`: ruff (lint and format check) on src, tests and bench, and mypy on src (`make test` runs it too).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# PyTorch first, pinned to the tested release; override freely (e.g. a CUDA build).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# the lower bounds of pyproject.toml, and the tests `make test-lowest` runs with them
LOWEST_SPEC ?= lightning==2.4.0 timm==1.0.7 pytorch-metric-learning==2.5.0
LOWEST_TESTS ?= tests/test_config.py tests/losses/test_metric_losses.py tests/losses/test_miners.py \
	tests/models/test_backbones.py tests/export/test_weights.py tests/training/test_console.py \
	tests/training/test_best_checkpoint.py tests/test_package.py

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

.PHONY: demo serve-demo docs-figures test test-browser test-lowest lint lint-only setup setup-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH_SPEC)
	touch $@

$(VENV)/.setup: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[all]"
	touch $@

$(VENV)/.setup-dev: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install --quiet -e ".[dev]"
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

docs-figures: setup
	$(BIN)/python docs/figures.py $(if $(CUB),--cub-root $(CUB))

# the tests, then the lint; either failing fails `make test`
test: setup-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS); tests=$$?; $(MAKE) --no-print-directory lint-only; lint=$$?; \
	[ $$tests -eq 0 ] && [ $$lint -eq 0 ]

test-browser: setup-dev
	$(BIN)/python -m pytest -m browser $(PYTEST_ARGS)

test-lowest:
	[ -x .venv-lowest/bin/python ] || $(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/python -c "import torch, torchvision" 2>/dev/null || .venv-lowest/bin/pip install --quiet $(TORCH_SPEC)
	.venv-lowest/bin/pip install --quiet -e ".[dev]" $(LOWEST_SPEC)
	.venv-lowest/bin/python -m pytest -q $(LOWEST_TESTS) $(PYTEST_ARGS)

lint: setup-dev
	$(MAKE) --no-print-directory lint-only

lint-only:
	$(BIN)/ruff check src tests bench && $(BIN)/ruff format --check src tests bench && $(BIN)/mypy

clean:
	rm -rf $(VENV) .venv-lowest runs .pytest_cache .ruff_cache .mypy_cache
