# `make run` trains the default config; `make test` checks the code with ruff and runs the test suite.
# Both create .venv and install the package on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/vdm_digits.py
WORKDIR ?= workdirs/vdm_digits

.PHONY: run test lint format install datasets clean

$(VENV)/.installed: setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,experiments]'
	touch $@

install: $(VENV)/.installed datasets

# Debian's Fashion-MNIST files (configs/vdm_fashion_mnist.py), where apt is available and we are root;
# elsewhere nothing happens and the builder downloads the same files when allowed (docs/data.md).
datasets:
	-@command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && { dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist); } || true

run: install
	$(PY) -m ddm_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Two workers, one test file each at a time: XLA:CPU compilation, most of the suite's time, is
# single-threaded, so two files at once use both cores; tests/conftest.py shares compiled programs.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20 tests

clean:
	rm -rf $(VENV) *.egg-info
