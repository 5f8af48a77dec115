#!/bin/bash
# Submit `allo run` (or one training stage) as a multi-node job after checking its batch arithmetic.
#
#   slurm/submit.sh RECIPE [--stage STAGE] --nodes N --gpus-per-node G [--gpu-memory 80GiB] [--time HH:MM:SS]
#                   [--partition P] [--problems N] [--cpu] [--force] [--dry-run] [--sbatch "EXTRA SBATCH ARGS"]
#                   [-- EXTRA ALLO ARGS]
#
# STAGE: run (default: the whole pipeline, `allo run`, resumable step by step) or one training stage (sft,
# warmup, dpo, npo, forget, improve). Prints the world size, each stage's global = micro x accumulation x world,
# the memory plan's one-line verdict (`allo plan`, for GPUs of --gpu-memory, default $ALLO_GPU_MEMORY or 80GiB),
# and the sbatch command, then submits (not with --dry-run). A plan that does not fit, or that cannot be made (it
# says why), is refused unless --force. --problems N: training problems for the GPU-hours before task.problems
# exists. -h/--help: this text.
# --cpu runs G processes per node without requesting GPUs (tests, CPU clusters; no memory plan).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/slurm/usage.sh" && usage_if_asked "$0" "$@"
recipe=${1:?usage: slurm/submit.sh RECIPE [--stage STAGE] --nodes N --gpus-per-node G [...]}; shift
nodes=1 gpus=1 stage="" time="" partition="" cpu=0 dry=0 force=0 extra_sbatch="" allo_extra=() problems=()
memory=${ALLO_GPU_MEMORY:-80GiB}
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --stage) stage=$2; shift 2 ;;
    --time) time=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --sbatch) extra_sbatch=$2; shift 2 ;;
    --gpu-memory) memory=$2; shift 2 ;;
    --problems) problems=(--problems "$2"); shift 2 ;;
    --cpu) cpu=1; shift ;;
    --force) force=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; allo_extra=("$@"); break ;;
    *) echo "submit.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
stage=${stage:-run}
python=${ALLO_PYTHON:-$here/.venv/bin/python}
check=(--stage "$stage"); [ "$stage" = run ] && check=()  # run: every training stage's arithmetic
"$python" -m allo.launch "$recipe" --nodes "$nodes" --gpus-per-node "$gpus" "${check[@]}" || exit 2
if [ "$cpu" = 0 ]; then
  sets=()  # the --set overrides among the allo arguments change the plan too
  for ((i = 0; i < ${#allo_extra[@]}; i++)); do
    [ "${allo_extra[$i]}" = --set ] && sets+=(--set "${allo_extra[$((i + 1))]}")
  done
  only=(); [ "$stage" = run ] || only=(--step "$stage")
  rc=0 why=$(mktemp)
  verdict=$("$python" -m allo plan "$recipe" --nodes "$nodes" --gpus-per-node "$gpus" --gpu-memory "$memory" \
            "${only[@]}" "${sets[@]}" ${problems[@]+"${problems[@]}"} --verdict 2>"$why") || rc=$?
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
export ALLO_LOG_DIR=${ALLO_LOG_DIR:-$here/logs}
args=(--nodes="$nodes" --job-name="allo-$stage" --output="$ALLO_LOG_DIR/%x-%j.out")
[ -n "$time" ] && args+=(--time="$time")
[ -n "$partition" ] && args+=(--partition="$partition")
[ "$cpu" = 1 ] || args+=(--gpus-per-node="$gpus")
read -r -a extra <<< "$extra_sbatch"
export ALLO_ROOT=$here ALLO_PYTHON=$python ALLO_PROCS_PER_NODE=$gpus
export ALLO_ARGS="$stage $recipe ${allo_extra[*]}"
[ "$cpu" = 1 ] && export CUDA_VISIBLE_DEVICES=  # the CPU for torch and DeepSpeed alike
echo "command: ALLO_ARGS='$ALLO_ARGS' sbatch ${args[*]} ${extra[*]} $here/slurm/allo.sbatch"
[ "$dry" = 1 ] && exit 0
mkdir -p "$ALLO_LOG_DIR"
sbatch --parsable --export=ALL "${args[@]}" "${extra[@]}" "$here/slurm/allo.sbatch"
