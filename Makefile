# `make run` trains the default config; `make test` runs the test suite.
# Both create .venv and install the package on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/vdm_digits.py
WORKDIR ?= workdirs/vdm_digits

.PHONY: run test install clean

$(VENV)/.installed: setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,experiments]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m ddm_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info
