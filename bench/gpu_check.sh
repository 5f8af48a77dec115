#!/usr/bin/env bash
# `make gpu-check`: the one command for a GPU machine that has torch but no package index. Three parts:
#   here, once:   bash bench/gpu_check.sh fetch        -> .whl/ (git-ignored): the wheels such a machine lacks (NEEDS
#                   and what they require beyond IMAGE, at .venv's versions), for Python 3.12 (the GPU image's),
#                   x86_64 (deepspeed built here: pure Python)
#   here, in CI:  bash bench/gpu_check.sh verify       -> a bare venv with only a GPU image's packages (torch,
#                   transformers, accelerate, pyarrow, numpy and what they need, linked from this venv: image_site.py)
#                   and the same wheels for this Python (.whl-verify-3.X/) installed as on the GPU (--no-index);
#                   imports everything the check imports
#   there:        bash bench/gpu_check.sh run          -> installs .whl/ to /tmp/site (nothing else), then
#                   1. bench/gpu.py: TRL's DPOTrainer beside allo dpo, then allo improve (dense and sparse moments),
#                      in alternating rounds within a time budget, the JSON written after every run
#                   2. pytest -m gpu: frozen elements, SIGTERM + resume, locate from partitions, the tiny pipeline
#                   3. the table of whatever finished (bench/gpu.py --table), printed last: what a caller sees
#                 and writes $OUT (default bench/results/gpu_check)/: gpu.json, gpu_logs/, pytest.log, check.log.
#   CPU smoke:    bash bench/gpu_check.sh run --smoke  -> the same script with this Python (PYTHON), the gpu tests
#                 collected only, bench/gpu.py --smoke: what CI runs so that the check itself never breaks there.
# As one device call: carry [".whl"], command "make gpu-check", timeout_s 590: the bench stops starting runs at
# 300 s (killed at 330 s), pytest at 200 s.
set -uo pipefail
cd "$(dirname "$0")/.."
source slurm/usage.sh && usage_if_asked bench/gpu_check.sh "$@"
NEEDS=(deepspeed trl datasets math-verify pytest tensorboard xxhash)  # what the check imports beyond the image (verify)
IMAGE=(torch transformers accelerate pyarrow numpy)  # what a GPU machine's image is taken to hold (verify)
GPU_PYTHON=3.12  # the GPU image's Python: .whl/ holds its builds only (a device call carries at most 64 MiB)

fetch() {  # [DIR PYTHON_VERSION]: NEEDS and their requirements beyond the image's, at .venv's versions (CI's)
  local dir=${1:-.whl} py=${2:-$GPU_PYTHON} python=${PYTHON:-.venv/bin/python} pins
  mkdir -p .git/info && { grep -qsx "/$dir/" .git/info/exclude || echo "/$dir/" >> .git/info/exclude; }
  pins=$("$python" bench/image_site.py --pins "${NEEDS[@]}" -- "${IMAGE[@]}") || exit 1
  rm -rf "$dir" && mkdir -p "$dir"
  python3 -m pip wheel -q --no-deps -w "$dir" "$(grep '^deepspeed==' <<< "$pins")" || exit 1  # an sdist: pure Python
  for w in $(grep -v '^deepspeed==' <<< "$pins"); do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$dir" "$w" || { echo "fetch: $w for Python $py failed" >&2; exit 1; }
  done
  du -sh "$dir"
}

# pip install of the brought wheels, as on the GPU: no index, no dependency resolution, each distribution's wheel
# for this Python picked from .whl/ (which holds several Pythons' builds)
install_wheels() {  # PYTHON WHEEL_DIR TARGET
  local names
  names=$(ls "$2"/*.whl | sed 's|.*/||; s|-.*||' | sort -u)
  # shellcheck disable=SC2086
  "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --find-links "$2" \
    --target "$3" $names
}

verify() {
  local python=${PYTHON:-.venv/bin/python} d wheels py
  py=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  wheels=${VERIFY_WHEELS:-.whl-verify-$py}  # the same pins as .whl/ for this Python; a clean clone fetches them
  ls "$wheels"/*.whl > /dev/null 2>&1 || fetch "$wheels" "$py" || exit 1
  d=$(mktemp -d)
  trap 'rm -rf "$d"' RETURN
  "$python" bench/image_site.py "$d/image" "${IMAGE[@]}" || exit 1
  "$python" -m venv --without-pip "$d/venv" || exit 1
  install_wheels "$python" "$wheels" "$d/site" ||
    { echo "verify: the wheels do not install with --no-index" >&2; exit 1; }
  # everything `make gpu-check` imports: allo's training path (engine, masks, tracker), TRL's peer, the eval's
  # checkers, the bench script and its test helpers, pytest
  PYTHONPATH="$d/site:$d/image:$PWD:$PWD/tests:$PWD/bench" PYTHONNOUSERSITE=1 "$d/venv/bin/python" -c "
import deepspeed, trl, datasets, math_verify, pytest, torch.utils.tensorboard
import allo.cli, allo.engine, allo.train, allo.masks.apply, allo.masks.locate, allo.stages.runner, allo.tracking
import allo.eval.run
import gpu, conftest, tiny
from trl import DPOConfig, DPOTrainer
from allo.tracking import missing
assert not missing(['tensorboard']), 'the default tracker (tensorboard) is not importable'
print('verify: every module make gpu-check imports is there with the brought wheels (deepspeed', deepspeed.__version__,
      '| trl', trl.__version__, '| datasets', datasets.__version__, ')')
" || { echo "verify: a module make gpu-check needs is in neither the GPU image nor .whl/ (add its distribution" \
          "to NEEDS)" >&2; exit 1; }
}

run() {
  local smoke=0 python=${PYTHON:-python3} rc=0
  [ "${1:-}" = --smoke ] && smoke=1
  out=${OUT:-bench/results/gpu_check}; mkdir -p "$out"
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  if [ "$smoke" = 0 ]; then
    ls .whl/*.whl > /dev/null 2>&1 || { echo "gpu-check: no wheels in .whl/; run 'bash bench/gpu_check.sh fetch' on" \
      "a machine with a package index and carry .whl along" >&2; exit 2; }
    install_wheels "$python" .whl /tmp/site || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/check.log"
  fi
  "$python" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, '| deepspeed', \
deepspeed.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())" \
    | tee -a "$out/check.log"
  # the table first: it is what a run cut short by its time limit must not lose
  if [ "$smoke" = 1 ]; then bench=(--smoke --max-rounds 2); else bench=(); fi
  rm -f "$out/gpu.json"
  timeout 330 "$python" bench/gpu.py "${bench[@]}" --budget-s 300 --out "$out/gpu.json" 2>&1 | tee -a "$out/check.log"
  case "${PIPESTATUS[0]}" in
    0) ;;
    124) rc=1; echo "gpu-check: bench/gpu.py reached its time limit; the table below holds what finished" >&2 ;;
    *) rc=1; echo "gpu-check: bench/gpu.py failed; see $out/check.log" >&2 ;;
  esac
  if [ "$smoke" = 1 ]; then tests=(--collect-only); else tests=(); fi
  timeout 200 "$python" -m pytest -q -rs -m gpu -p no:cacheprovider "${tests[@]}" tests/test_gpu.py \
    > "$out/pytest.log" 2>&1 || { rc=1; echo "gpu-check: pytest -m gpu failed or timed out; see $out/pytest.log" >&2; }
  tail -15 "$out/pytest.log"
  echo; "$python" bench/gpu.py --table "$out/gpu.json" | tee "$out/table.md"
  echo "gpu-check: $([ $rc = 0 ] && echo passed || echo FAILED); results in $out"
  return $rc
}

case "${1:-}" in
  fetch) fetch ;;
  verify) verify ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash bench/gpu_check.sh fetch | verify | run [--smoke]" >&2; exit 2 ;;
esac
