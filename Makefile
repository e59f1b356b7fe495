# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	# reference implementation for parity tests only, without its heavy extras
	$(PY) -m pip install --no-deps voxcpm==2.0.3
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m voxcpm_train.demo

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
