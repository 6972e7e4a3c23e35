# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# CPU torch first when the venv has none (a bare `torch` requirement pulls a multi-GB CUDA
# build); GPU users install their CUDA build into .venv before `make install` (README).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,dashboard,plots]"
	$(PY) -c "from c5snn.kernels import backend; backend()"  # build the CPU kernels once (~20 s)
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

# The 72-point grid at W=90 on the shipped CA5 data (data/), smoke-scale training budget.
demo: install
	$(VENV)/bin/c5snn phase-c-sweep --config studies/quickstart.yaml --workers 2

bench: install
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf storage/c5snn.db* storage/artifacts results
