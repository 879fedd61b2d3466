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

# The main job on the built-in default: train the tiny model on `shapes`, sample, grade.
DEMO ?= runs/tiny
demo: venv
	$(PY) -m train --config configs/tiny.py --workdir $(DEMO)/shared
	$(PY) -m sample --ensemble $(DEMO)/shared --num 8 --out $(DEMO)/samples \
		--prompt "a red circle" --prompt "a blue square" --prompt "a green triangle" \
		--prompt "a yellow circle" --prompt "a magenta square" --prompt "a cyan triangle"
	$(PY) -m sample.evaluate --ensemble $(DEMO)/shared --num 64

clean:
	rm -rf $(VENV)
