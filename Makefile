# Two entry points on a fresh machine:  make serve  |  make test
# Both create .venv and build the package (Cython kernel, protobuf stubs) when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LISTEN ?= 127.0.0.1:50051
DATABASE ?= reimburse.db
BUILD_INPUTS := pyproject.toml setup.py $(wildcard engine/*.pyx engine/*.pxd server/*.pyx server/*.pxd server/ledger/*.pyx proto/*/*/*.proto)

.PHONY: install serve test bench load conformance clean

$(VENV)/.built: $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.built

serve: install
	$(PY) -m server --listen $(LISTEN) --database $(DATABASE) --insecure

test: install
	$(PY) -m pytest

conformance: install
	$(PY) -m engine.scenarios --check tests/golden/*.json

bench: install
	$(PY) -m benchmarks.kernel
	$(PY) -m pytest benchmarks --benchmark-only

load: install
	$(PY) -m benchmarks.load --spawn --modes echo,presettle,settle,batch-presettle,batch-settle --duration 5

clean:
	rm -rf build *.egg-info engine/_kernel.c engine/*.so server/_wire.c server/_single.c server/_logline.c server/*.so reimburse $(VENV)
