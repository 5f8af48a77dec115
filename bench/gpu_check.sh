#!/usr/bin/env bash
# `make gpu-check`: the one command for a GPU machine that has torch but no package index. Two halves:
#   here, once:   bash bench/gpu_check.sh fetch        -> .whl/ (git-ignored): the wheels such a machine lacks, for
#                                                         its Python 3.12 / x86_64 (deepspeed built here: pure Python)
#   there:        bash bench/gpu_check.sh run          -> installs .whl/ to /tmp/site (nothing else), then
#                   1. bench/gpu.py: TRL's DPOTrainer, allo dpo, allo improve (dense and sparse moments), one table
#                   2. pytest -m gpu: frozen elements, SIGTERM + resume, locate from partitions, the tiny pipeline
#                 and writes $OUT (default bench/results/gpu_check)/: gpu.json, gpu_logs/, pytest.log, check.log.
#   CPU smoke:    bash bench/gpu_check.sh run --smoke  -> the same script with this Python (PYTHON), the gpu tests
#                 collected only, bench/gpu.py --smoke: what CI runs so that the check itself never breaks there.
# As one device call: carry [".whl"], command "make gpu-check", timeout_s 570 (each half has its own limit: 240 s
# and 300 s; the notes' timings put the whole check at about 8 minutes on one H200).
set -uo pipefail
cd "$(dirname "$0")/.."
source slurm/usage.sh && usage_if_asked bench/gpu_check.sh "$@"
WHEELS=(deepspeed==0.19.8 hjson==3.1.0 ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection
        typing_extensions math-verify==0.9.0 latex2sympy2_extended antlr4-python3-runtime==4.13.2 datasets==5.2.0
        dill multiprocess trl==1.16.0 pytest pluggy iniconfig pygments)  # the rest is in the machine's image

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
  local smoke=0 python=${PYTHON:-python3} rc=0
  [ "${1:-}" = --smoke ] && smoke=1
  out=${OUT:-bench/results/gpu_check}; mkdir -p "$out"
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  if [ "$smoke" = 0 ]; then
    ls .whl/*.whl > /dev/null 2>&1 || { echo "gpu-check: no wheels in .whl/; run 'bash bench/gpu_check.sh fetch' on" \
      "a machine with a package index and carry .whl along" >&2; exit 2; }
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/check.log"
  fi
  "$python" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, '| deepspeed', \
deepspeed.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())" \
    | tee -a "$out/check.log"
  # the table first: it is what a run cut short by its time limit must not lose
  if [ "$smoke" = 1 ]; then bench=(--smoke); else bench=(); fi
  timeout 240 "$python" bench/gpu.py "${bench[@]}" --out "$out/gpu.json" 2>&1 | tee -a "$out/check.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { rc=1; echo "gpu-check: bench/gpu.py failed; see $out/check.log" >&2; }
  if [ "$smoke" = 1 ]; then tests=(--collect-only); else tests=(); fi
  timeout 300 "$python" -m pytest -q -rs -m gpu -p no:cacheprovider "${tests[@]}" tests/test_gpu.py \
    > "$out/pytest.log" 2>&1 || { rc=1; echo "gpu-check: pytest -m gpu failed; see $out/pytest.log" >&2; }
  tail -15 "$out/pytest.log"
  echo "gpu-check: $([ $rc = 0 ] && echo passed || echo FAILED); results in $out"
  return $rc
}

case "${1:-}" in
  fetch) fetch ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash bench/gpu_check.sh fetch | run [--smoke]" >&2; exit 2 ;;
esac
