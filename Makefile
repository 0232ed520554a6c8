# Two entry points: `make test` and `make demo`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install test test-fast notebooks demo report quality clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU torch first: an unpinned torch would pull GBs of CUDA packages.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev,notebooks]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

notebooks: $(STAMP)
	$(PY) -m pytest -q -s tests/test_notebooks.py

report: $(STAMP)
	$(PY) benchmarks/report.py

demo: $(STAMP)
	$(PY) benchmarks/demo.py

quality: $(STAMP)
	$(PY) -m ruff check drone_hf tests benchmarks examples
	$(PY) -m ruff format --check drone_hf tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
