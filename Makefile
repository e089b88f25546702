# The two entry points of the README. Both create .venv/ on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

## demo: SynthPedes -> teacher -> students -> ONNX -> int8 -> benchmark table (measured: 34 min on a shared 2-core CPU)
demo: $(STAMP)
	$(VENV)/bin/tbps-compress run recipes/pipeline/synth-demo.yaml

## test: the fast test suite (CPU, a few minutes)
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" --durations=15

## test-all: also the slow tests (scale checks)
test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
