# `make test` and `make demo` are the whole set-up on a fresh machine: each creates .venv
# on first use (skipped when requirements.txt and pyproject.toml have not changed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo
# e.g. https://download.pytorch.org/whl/cpu: torch is installed from that index first (on Linux,
# plain PyPI's torch is the CUDA build); empty: torch comes from PyPI with the rest
TORCH_INDEX ?=

.PHONY: test demo lint venv clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet --index-url $(TORCH_INDEX) "$$(grep '^torch==' requirements.txt)")
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadgroup -q --durations=25 tests

demo: $(STAMP)
	$(BIN)/rectdiff compare --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check src tests experiments
	$(BIN)/ruff format --check src tests experiments

clean:
	rm -rf $(VENV)
