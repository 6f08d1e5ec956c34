# nnlab: the two commands of the course are `make lab` and `make test`.
#
#   make lab    create .venv if missing, install nnlab, start JupyterLab on notebooks/
#   make test   create .venv if missing, run the unit tests and every notebook (quick mode)
#   make bench  run the benchmarks (full mode) and write JSON figures to build/bench/
#   make strip  clear notebook outputs before committing
#
# Variables: PYTHON (interpreter that creates .venv, default python3),
# PIP_ARGS (extra pip arguments, e.g. a CPU-only PyTorch index), PORT.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nnlab-installed
PORT   ?= 8888
PIP_ARGS ?=
# JupyterLab refuses to run as root (e.g. in a container) unless told it may.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test bench install clean-venv strip

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q $(PIP_ARGS) -e ".[dev]"
	@touch $(STAMP)

lab: $(STAMP)
	@echo "Starting JupyterLab on notebooks/ ; open the URL printed below (with its token) in a browser."
	$(BIN)/jupyter lab --notebook-dir=notebooks --port=$(PORT) --no-browser $(ROOT_FLAG)

test: $(STAMP)
	NNLAB_QUICK=1 $(BIN)/python -m pytest --nbval-lax --nbval-current-env tests notebooks

bench: $(STAMP)
	@mkdir -p build/bench
	@for b in benchmarks/*.py; do \
	  [ "$$(basename $$b)" = "__init__.py" ] && continue; \
	  echo "== $$b"; $(BIN)/python $$b --json > build/bench/$$(basename $$b .py).json || exit 1; \
	  cat build/bench/$$(basename $$b .py).json; \
	done

strip:
	$(BIN)/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

clean-venv:
	rm -rf $(VENV)
