# Two commands set up everything on a fresh machine:
#   make demo   creates .venv if missing, installs, runs the default workflow
#   make test   same venv; the test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean-results bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision come from this machine's local wheel cache when present (pip's config);
# the ranges in pyproject.toml also admit a preinstalled newer torch on GPU nodes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q "torch>=2.9" "torchvision>=0.24"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The demo adds config/demo.yaml (fewer view steps than the library's defaults); a run with your
# own --configfile gets the schema's defaults.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --printshellcmds --configfile config/demo.yaml
	@echo "results: results/ (reports: results/<model>/report/index.html, summary: results/summary/)"

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	@# ruff includes the complexity check (C901, max-complexity in pyproject.toml)
	$(BIN)/ruff check cnnvis_pipeline tests vulture_whitelist.py
	@# dead code; settings and the names it cannot see used: pyproject.toml, vulture_whitelist.py
	$(BIN)/vulture
	$(BIN)/snakefmt --check Snakefile workflow/rules
	@# Every lint but "specify a conda environment" fails the target: the workflow runs from
	@# the project's venv (make install), not from per-rule conda environments.
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --lint --cores 1 > .snakemake-lint.txt 2>&1 || \
	  ! grep -E '^\s+\* ' .snakemake-lint.txt | grep -v 'conda environment'
	@rm -f .snakemake-lint.txt

bench: $(STAMP)
	$(BIN)/python -m cnnvis_pipeline.bench --images 1000 --size 224 --device cpu

clean-results:
	rm -rf results .snakemake
