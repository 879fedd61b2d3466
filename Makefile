# `make test` on a fresh machine: make a Python 3.12 venv, install, run the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# python3.12 on PATH, else pyenv's 3.12 (the dev machines have it there).
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" --version >/dev/null 2>&1 && { echo "$$p"; break; }; done)

.PHONY: test venv demo clean

$(VENV)/.installed: requirements.txt
	@test -n "$(PYTHON312)" || { echo "error: no working python3.12 found (set PYTHON312=...)"; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
