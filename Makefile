# DogFS: `make run` starts a local cluster with a demo, `make test` runs the checks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_HOME ?= $(CURDIR)/.dogfs-demo
# glibc malloc hands pyeclib fresh pages on every call unless told otherwise (PERFORMANCE.md).
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 1073741824

.PHONY: install run test lint typecheck trial bench clean

install: $(STAMP)

$(STAMP): requirements.txt setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	@rm -f twisted/plugins/dropin.cache
	@touch $(STAMP)

run: install
	$(BIN)/python -m dogfs.cli.demo --home $(DEMO_HOME)

lint: install
	$(BIN)/ruff check dogfs tests bench twisted

typecheck: install
	$(BIN)/mypy dogfs

trial: install
	$(BIN)/python -m twisted.trial --force-gc $(TRIAL_ARGS) tests

test: lint typecheck trial

bench: install
	$(BIN)/python bench/datapath.py

clean:
	rm -rf $(VENV) _trial_temp .mypy_cache .ruff_cache *.egg-info
