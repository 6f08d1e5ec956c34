# nnlab: the two commands of the course are `make lab` and `make test`.
#
#   make lab     create .venv if missing, install nnlab (with the onnx extra), start JupyterLab on notebooks/
#   make test    create .venv if missing, run the unit tests and every notebook (quick mode)
#   make course  run every notebook headless in full mode into build/executed/ (what a class sees)
#   make bench   run the benchmarks (full mode) and write JSON figures to build/bench/
#   make bench-notebooks  time every notebook on one core (full mode, cold cache)
#   make claims  measure every notebook claim over 3 seeds and 1 and 2 threads (full mode, long)
#   make badges  point the Binder and Colab badges at REPO and REF (see binder/repo.mk)
#   make strip   clear notebook outputs before committing
#
# Variables: PYTHON (interpreter that creates .venv, default python3),
# PIP_ARGS (extra pip arguments, e.g. a CPU-only PyTorch index), PORT,
# REPO and REF (the GitHub repository and branch or tag of the badges).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nnlab-installed
PORT   ?= 8888
PIP_ARGS ?=
# JupyterLab refuses to run as root (e.g. in a container) unless told it may.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
# JupyterLab defaults for the course (no news pop-up); Binder installs the same file (binder/postBuild).
LAB_SETTINGS := $(CURDIR)/binder/lab-settings
# REPO and REF: where the badges point; `make badges REPO=... REF=...` changes them.
include binder/repo.mk

.PHONY: lab test bench bench-notebooks course claims badges install clean-venv strip

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q $(PIP_ARGS) -e ".[dev]"
	@touch $(STAMP)

lab: $(STAMP)
	@echo "Starting JupyterLab on notebooks/ ; open the URL printed below (with its token) in a browser."
	$(BIN)/jupyter lab --notebook-dir=notebooks --port=$(PORT) --no-browser $(ROOT_FLAG) \
	  --LabApp.app_settings_dir=$(LAB_SETTINGS)

test: $(STAMP)
	NNLAB_QUICK=1 $(BIN)/python -m pytest --nbval-lax --nbval-current-env tests notebooks

BENCHES := elimination reduction nna cli_startup compress_cold finite_checks onnx_export

bench: $(STAMP)
	@mkdir -p build/bench
	@for b in $(BENCHES); do \
	  echo "== benchmarks/$$b.py"; \
	  $(BIN)/python benchmarks/$$b.py --json > build/bench/$$b.json || exit 1; \
	  cat build/bench/$$b.json; \
	done

# Run the whole course headless in full mode (even where CI is set), one notebook after the other, sharing
# the model cache (NNLAB_CACHE) as a class would: executed copies land in build/executed/.  A notebook that
# fails does not stop the others; the list of failures and the exit status come at the end.
course: $(STAMP)
	@mkdir -p build/executed
	@failed=""; skipped=""; for nb in notebooks/[0-9][0-9]_*.ipynb; do \
	  start=$$(date +%s); \
	  if [ -n "$(COURSE_DEADLINE)" ] && [ $$start -ge "$(COURSE_DEADLINE)" ]; then \
	    skipped="$$skipped $$nb"; echo "course: $$nb not run: the time budget (COURSE_DEADLINE) is spent"; continue; \
	  fi; \
	  NNLAB_QUICK=0 $(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=3600 \
	    --log-level=ERROR --output-dir build/executed "$$nb" || failed="$$failed $$nb"; \
	  echo "course: $$nb $$(( $$(date +%s) - start )) s"; \
	done; \
	if [ -n "$$failed" ]; then echo "course: FAILED:$$failed"; exit 1; fi; \
	if [ -n "$$skipped" ]; then echo "course: passed; not run for lack of time:$$skipped"; \
	else echo "course: every notebook passed"; fi

# Every notebook in full mode on one core, each with an empty model cache (about a quarter of an hour).
bench-notebooks: $(STAMP)
	@mkdir -p build/bench
	$(BIN)/python benchmarks/notebooks.py --json > build/bench/notebooks.json
	@cat build/bench/notebooks.json

# The spread of every claim over seeds 0-2 and 1 and 2 threads (six full runs of the course: over half an hour).
claims: $(STAMP)
	@mkdir -p build/bench
	$(BIN)/python benchmarks/claims.py --json > build/bench/claims.json
	@echo "claims: figures in build/bench/claims.json"

badges:
	$(PYTHON) binder/badges.py --repo $(REPO) --ref $(REF)

strip:
	$(BIN)/jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

clean-venv:
	rm -rf $(VENV)
