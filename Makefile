# Two entry points for a fresh clone; each sets itself up (a venv in .venv).
#   make demo   the main job on the embedded default: train LoRA + IADA on a tiny model
#               and synthetic data it builds itself (CPU, a few minutes)
#   make test   the test suite (what CI runs); make test-slow: the slow set it leaves out
#   make eval   the paper's benchmark table on the embedded model and benchmark fixtures, and the
#               synthetic world's held-out perception / reasoning / text sets
#   make study  the reasoning-tax study on the synthetic world (about 27 min on 2 CPU cores)
#   make parity our logits against transformers' on a tiny random model
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo eval study parity test test-slow clean

setup: $(VENV)/.installed

# Reinstall when the dependencies change. torch is pinned to the local CPU wheel (2.13.0).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	rm -rf runs/demo
	$(PY) train.py --out runs/demo

# The embedded model (+ the demo's adapters when `make demo` ran) on fixtures of the 11 benchmarks
# and on the synthetic world's held-out sets (the demo trains on that world).
eval: setup
	$(PY) eval.py --out runs/eval $$(test -d runs/demo/final && echo --adapter runs/demo)

study: setup
	$(PY) -m iada_jax.study.reasoning_tax --out runs/study

parity: setup
	$(PY) -m iada_jax.embedded.demo

test: setup
	$(PY) -m pytest -q -n 2 --dist loadscope

# The slow set (marked slow, left out of `make test`): the CPU run of bench/device_run.sh.
test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
