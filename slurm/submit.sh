#!/bin/bash
# Submit `allo run` (or one training stage) as a multi-node job after checking everything it will need.
#
#   slurm/submit.sh RECIPE [--stage STAGE] --nodes N --gpus-per-node G [--gpu-memory 80GiB] [--time HH:MM:SS]
#                   [--partition P] [--problems N] [--cpu] [--force] [--dry-run] [--sbatch "EXTRA SBATCH ARGS"]
#                   [-- EXTRA ALLO ARGS]
#
# STAGE: run (default: the whole pipeline, `allo run`, resumable step by step) or one training stage (sft,
# warmup, dpo, npo, forget, improve). Before anything is queued, and with --dry-run too, it runs the job's whole
# pre-flight at its world size with the EXTRA ALLO ARGS (--set values included): every input file, the teacher's
# and the judge's API keys, the chat template, every step's global = micro x accumulation x world; it prints
# every problem with its fix and exits 2. Then the memory plan's one-line verdict (`allo plan`, for GPUs of
# --gpu-memory, default $ALLO_GPU_MEMORY or 80GiB) and the sbatch command; then it submits (not with --dry-run). A
# plan that does not fit, or that cannot be made (it says why), is refused unless --force. --problems N: training
# problems for the GPU-hours before task.problems exists. -h/--help: this text.
#
# Python: $ALLO_PYTHON, else .venv-gpu (`make install-gpu`), else .venv (`make install`, CPU torch); the dry run
# names the choice, and a GPU job whose Python has a CPU-only torch is refused. The job runs in the directory you
# submit from: relative paths (the recipe, data, output_dir) resolve there, as they did for the checks; logs go to
# ./logs (ALLO_LOG_DIR moves them). The EXTRA ALLO ARGS reach allo on every node exactly as given.
# --cpu runs G processes per node without requesting GPUs (tests, CPU clusters; no memory plan).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/slurm/usage.sh" && usage_if_asked "$0" "$@"
source "$here/slurm/python.sh"
recipe=${1:?usage: slurm/submit.sh RECIPE [--stage STAGE] --nodes N --gpus-per-node G [...]}; shift
resubmit=("$0" "$recipe")  # this command without --dry-run and the allo arguments: the job's resubmit hint
nodes=1 gpus=1 stage="" time="" partition="" cpu=0 dry=0 force=0 extra_sbatch="" allo_extra=() problems=()
memory=${ALLO_GPU_MEMORY:-80GiB}
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; allo_extra=("$@"); break ;;
    --cpu|--force|--dry-run) [ "$1" = --dry-run ] || resubmit+=("$1") ;;&
    --cpu) cpu=1; shift ;;
    --force) force=1; shift ;;
    --dry-run) dry=1; shift ;;
    --nodes|--gpus-per-node|--stage|--time|--partition|--sbatch|--gpu-memory|--problems)
      [ $# -ge 2 ] || { echo "submit.sh: $1 needs a value" >&2; exit 2; }
      resubmit+=("$1" "$2") ;;&
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --stage) stage=$2; shift 2 ;;
    --time) time=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --sbatch) extra_sbatch=$2; shift 2 ;;
    --gpu-memory) memory=$2; shift 2 ;;
    --problems) problems=(--problems "$2"); shift 2 ;;
    *) echo "submit.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
stage=${stage:-run}
choose_python "$here"
echo "python: $python ($python_why)"
gpu=(); [ "$cpu" = 1 ] || gpu=(--gpu)
checked=0
"$python" -m allo.launch "$recipe" --nodes "$nodes" --gpus-per-node "$gpus" --stage "$stage" ${gpu[@]+"${gpu[@]}"} \
  -- ${allo_extra[@]+"${allo_extra[@]}"} || checked=2
if [ "$cpu" = 0 ]; then  # the memory plan too, whatever the checks said: one answer with everything
  sets=()  # the --set overrides among the allo arguments change the plan too
  for ((i = 0; i < ${#allo_extra[@]}; i++)); do
    [ "${allo_extra[$i]}" = --set ] && sets+=(--set "${allo_extra[$((i + 1))]}")
  done
  only=(); [ "$stage" = run ] || only=(--step "$stage")
  rc=0 why=$(mktemp)
  verdict=$("$python" -m allo plan "$recipe" --nodes "$nodes" --gpus-per-node "$gpus" --gpu-memory "$memory" \
            ${only[@]+"${only[@]}"} ${sets[@]+"${sets[@]}"} ${problems[@]+"${problems[@]}"} --verdict 2>"$why") || rc=$?
  if [ "$rc" = 0 ] || [ "$rc" = 3 ]; then
    echo "memory plan: $verdict"
  else
    echo "memory plan: cannot be made: $(tail -n 1 "$why")"
  fi
  rm -f "$why"
  if [ "$rc" = 3 ] && [ "$force" = 0 ]; then
    echo "submit.sh: refused: the plan does not fit (see \`allo plan $recipe --nodes $nodes --gpus-per-node $gpus" \
         "--gpu-memory $memory\`; --force submits anyway)" >&2
    exit 2
  elif [ "$rc" != 0 ] && [ "$rc" != 3 ] && [ "$force" = 0 ]; then
    echo "submit.sh: refused: no memory plan (fix what it says, or --force to submit without one)" >&2
    exit 2
  fi
fi
[ "$checked" = 0 ] || exit 2
ALLO_LOG_DIR=$(realpath -m "${ALLO_LOG_DIR:-logs}")
export ALLO_LOG_DIR
args=(--nodes="$nodes" --job-name="allo-$stage" --output="$ALLO_LOG_DIR/%x-%j.out")
[ -n "$time" ] && args+=(--time="$time")
[ -n "$partition" ] && args+=(--partition="$partition")
[ "$cpu" = 1 ] || args+=(--gpus-per-node="$gpus")
read -r -a extra <<< "$extra_sbatch"
# the job: its Python, this checkout's allo, and the command that resubmits it (the failure hint prints it)
export ALLO_ROOT=$here ALLO_PYTHON=$python ALLO_PROCS_PER_NODE=$gpus ALLO_RESUBMIT=$(quoted "${resubmit[@]}")
[ "$cpu" = 1 ] && export CUDA_VISIBLE_DEVICES=  # the CPU for torch and DeepSpeed alike
job=(sbatch --parsable --export=ALL "${args[@]}" ${extra[@]+"${extra[@]}"} "$here/slurm/allo.sbatch" "$stage" "$recipe"
     ${allo_extra[@]+"${allo_extra[@]}"})
echo "command: $(quoted "${job[@]}")"
[ "$dry" = 1 ] && exit 0
mkdir -p "$ALLO_LOG_DIR"
"${job[@]}"
