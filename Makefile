# nnlab: the two commands of the course are `make lab` and `make test`.
#
#   make lab    create .venv if missing, install nnlab, start JupyterLab on notebooks/
#   make test   create .venv if missing, run the unit tests and every notebook (quick mode)
#   make bench  run the benchmarks (full mode) and write JSON figures to build/bench/
#   make bench-notebooks  time every notebook on one core (full mode, cold cache)
#   make course run every notebook headless (full mode) into build/executed/
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

.PHONY: lab test bench bench-notebooks course install clean-venv strip

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

BENCHES := elimination reduction nna cli_startup finite_checks

bench: $(STAMP)
	@mkdir -p build/bench
	@for b in $(BENCHES); do \
	  echo "== benchmarks/$$b.py"; \
	  $(BIN)/python benchmarks/$$b.py --json > build/bench/$$b.json || exit 1; \
	  cat build/bench/$$b.json; \
	done

# Run the whole course headless (full mode): executed copies land in build/executed/.
course: $(STAMP)
	@mkdir -p build/executed
	$(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=1800 \
	  --output-dir build/executed notebooks/[0-9][0-9]_*.ipynb

# Every notebook in full mode on one core, each with an empty model cache (about a quarter of an hour).
bench-notebooks: $(STAMP)
	@mkdir -p build/bench
	$(BIN)/python benchmarks/notebooks.py --json > build/bench/notebooks.json
	@cat build/bench/notebooks.json

strip:
	$(BIN)/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

clean-venv:
	rm -rf $(VENV)
