#!/bin/bash
# Submit `allo run` (or one training stage) as a multi-node job after checking its batch arithmetic.
#
#   slurm/submit.sh RECIPE [--stage STAGE] --nodes N --gpus-per-node G [--time HH:MM:SS] [--partition P]
#                   [--cpu] [--dry-run] [--sbatch "EXTRA SBATCH ARGS"] [-- EXTRA ALLO ARGS]
#
# STAGE: run (default: the whole pipeline, `allo run`, resumable step by step) or one training stage (sft,
# warmup, dpo, npo, forget, improve). Prints the world size, each stage's global = micro x accumulation x world,
# and the sbatch command, then submits (not with --dry-run). --cpu runs G processes per node without requesting GPUs (tests, CPU clusters).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
recipe=${1:?usage: slurm/submit.sh RECIPE [--stage STAGE] --nodes N --gpus-per-node G [...]}; shift
nodes=1 gpus=1 stage="" time="" partition="" cpu=0 dry=0 extra_sbatch="" allo_extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --stage) stage=$2; shift 2 ;;
    --time) time=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --sbatch) extra_sbatch=$2; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; allo_extra=("$@"); break ;;
    *) echo "submit.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
stage=${stage:-run}
python=${ALLO_PYTHON:-$here/.venv/bin/python}
check=(--stage "$stage"); [ "$stage" = run ] && check=()  # run: every training stage's arithmetic
"$python" -m allo.launch "$recipe" --nodes "$nodes" --gpus-per-node "$gpus" "${check[@]}" || exit 2
export ALLO_LOG_DIR=${ALLO_LOG_DIR:-$here/logs}
mkdir -p "$ALLO_LOG_DIR"
args=(--nodes="$nodes" --job-name="allo-$stage" --output="$ALLO_LOG_DIR/%x-%j.out")
[ -n "$time" ] && args+=(--time="$time")
[ -n "$partition" ] && args+=(--partition="$partition")
[ "$cpu" = 1 ] || args+=(--gpus-per-node="$gpus")
read -r -a extra <<< "$extra_sbatch"
export ALLO_ROOT=$here ALLO_PYTHON=$python ALLO_PROCS_PER_NODE=$gpus
export ALLO_ARGS="$stage $recipe ${allo_extra[*]}"
[ "$cpu" = 1 ] && export DS_ACCELERATOR=cpu
echo "command: ALLO_ARGS='$ALLO_ARGS' sbatch ${args[*]} ${extra[*]} $here/slurm/allo.sbatch"
[ "$dry" = 1 ] && exit 0
sbatch --parsable --export=ALL "${args[@]}" "${extra[@]}" "$here/slurm/allo.sbatch"
