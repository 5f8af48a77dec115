# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv itself when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast bench bench-quick clean

install: $(STAMP)

# torch first (the constraints file pins the local CPU build; an unpinned torch pulls GBs of CUDA wheels),
# then the pinned requirements, then this package in editable mode. Any failed step stops make.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import torch, deepspeed, transformers, allo; print('installed: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python recipes/tiny/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Side-by-side benchmarks (bench/run_all.py); TRL is installed only here, as the baseline.
$(VENV)/.bench: $(STAMP) bench/requirements.txt
	$(BIN)/python -m pip install -q -c constraints.txt -r bench/requirements.txt
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python bench/run_all.py

bench-quick: $(VENV)/.bench
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf runs .pytest_cache
