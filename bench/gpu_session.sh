#!/usr/bin/env bash
# The prepared check for a session that is lent a GPU machine (the device tool: torch is there, deepspeed and the
# rest are not, and nothing can be downloaded there). Two halves:
#   here, once:  bash bench/gpu_session.sh fetch   -> .whl/ (git-ignored): the wheels the GPU machine lacks, for
#                                                    its Python 3.12 / x86_64 (deepspeed built here: pure Python)
#   there:       bash bench/gpu_session.sh run     -> installs them to /tmp/site, then, each with its own time limit:
#                  1. bench/gpu.py: DPO vs ALLO improve on a 1.1 B random Llama, ZeRO-3, bf16 (MFU, peak memory)
#                  2. the reduced tiny demo in bf16 on 1 GPU: every `allo run` step, sampling included
#                writes $OUT/gpu.json, $OUT/gpu.log and $OUT/tiny_bf16.log for bench/RESULTS.md.
# As one device call: carry [".whl"], command "bash bench/gpu_session.sh run", timeout_s 540.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(deepspeed==0.19.8 hjson==3.1.0 ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection
        math-verify==0.9.0 latex2sympy2_extended antlr4-python3-runtime==4.13.2 datasets==5.2.0 dill
        multiprocess)  # the rest (transformers, safetensors, pyarrow, xxhash, ...) is in the machine's image

fetch() {
  mkdir -p .git/info && { grep -qsx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude; }
  rm -rf .whl && mkdir -p .whl
  python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8 || exit 1  # an sdist: build the pure-Python wheel
  for w in "${WHEELS[@]:1}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$w" || { echo "fetch: $w failed" >&2; exit 1; }
  done
  du -sh .whl
}

run() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  out=${OUT:-/tmp/gpu_out}; mkdir -p "$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.log"
  python3 -c "import torch, deepspeed, transformers; print('torch', torch.__version__, '| deepspeed', \
deepspeed.__version__, '| transformers', transformers.__version__)" | tee -a "$out/gpu.log"
  timeout 300 python3 bench/gpu.py --steps 12 2>&1 | tee -a "$out/gpu.log"
  cp bench/results/gpu.json "$out/" 2>/dev/null
  timeout 200 python3 recipes/tiny/demo.py --quick --seeds 0 --ranks 1 --set model.dtype=bf16 \
    --set locate.from_partitions=true 2>&1 | tail -40 > "$out/tiny_bf16.log"
  tail -12 "$out/tiny_bf16.log"
}

case "${1:-}" in
  fetch) fetch ;;
  run) run ;;
  *) echo "usage: bash bench/gpu_session.sh fetch|run" >&2; exit 2 ;;
esac
