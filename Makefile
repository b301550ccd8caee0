# The README's two commands are `make demo` (the main job) and `make test` (the test suite); each bootstraps .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK ?= constraints.txt
PIP_LOCK := $(if $(LOCK),-c $(LOCK),)
STAMP := $(VENV)/.installed

.PHONY: install demo test docs clean-venv lint-notebooks

$(STAMP): settings.ini setup.py $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(PIP_LOCK) -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name echocare-clip --display-name 'Python (echocare-clip)' >/dev/null
	@touch $(STAMP)
	@echo "installed: $(VENV) (kernel 'echocare-clip')"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/echocare-clip demo

test: $(STAMP)
	@PATH=$(CURDIR)/$(BIN):$$PATH bash tools/test.sh

docs: $(STAMP)
	@PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python tools/build_docs.py

clean-venv:
	rm -rf $(VENV)
