# The two commands of the README's quick start. Each creates or reuses .venv (scripts/venv.sh:
# torch, the package with its test extras, the compiled extension), then runs.
#   make demo   pretrain vitaev2_tiny on the synthetic phantoms (~3 min on a 2-core CPU)
#   make test   the test suite (python -m pytest -q)
# TORCH_SPEC=... overrides the torch requirement (default torch==2.13.0, this machine's CPU build).
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: venv demo test
venv:
	@bash scripts/venv.sh

demo: venv
	$(PY) -m dinocxr_fast.train

test: venv
	$(PY) -m pytest -q
