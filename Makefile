# The two entry points of the README. Both create .venv/ on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint clean-demo browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

## demo: SynthPedes -> teacher -> students -> ONNX -> int8 -> benchmark table (measured: 33 min on a quiet 2-core CPU with the data present)
demo: $(STAMP)
	$(VENV)/bin/tbps-compress run recipes/pipeline/synth-demo.yaml

## browser: Debian's Chromium for the page test of tests/test_serve.py, installed when missing and apt-get is usable
## (as root); otherwise that test skips and says why. Set NO_BROWSER_INSTALL=1 to leave the system alone.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ -n "$(NO_BROWSER_INSTALL)" ]; then echo "NO_BROWSER_INSTALL set: the browser test will skip"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (Debian package) for the browser test"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	    || echo "chromium could not be installed: the browser test will skip"; \
	else echo "no chromium, and apt-get needs root: the browser test will skip (apt-get install chromium)"; fi

## optimum: the optimum extra for the test of `quantize --backend optimum` (installed once; when pip cannot install
## it, that test skips and says why)
$(VENV)/.optimum: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,optimum]' \
	  || echo "the optimum extra could not be installed: the optimum backend test will skip"
	touch $@

## test: the fast test suite (CPU, a few minutes)
test: $(STAMP) browser $(VENV)/.optimum
	$(PY) -m pytest -q -m "not slow and not gpu" --durations=15

## test-all: also the slow tests (scale checks)
test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
