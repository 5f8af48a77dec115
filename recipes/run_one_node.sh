#!/bin/bash
# One node: `allo run RECIPE` on every GPU of this machine (torchrun), after checking the batch arithmetic.
#
#   recipes/run_one_node.sh RECIPE [--dry-run] [allo run options: --from STEP, --only STEP, --set KEY=VALUE ...]
#
# --dry-run (anywhere): check the batch arithmetic and print the command, run nothing. -h/--help: this text.
#
# GPUs are counted with torch (set ALLO_GPUS to override, e.g. to use fewer). Without a GPU it runs 1 process
# on the CPU (tiny recipes only). The paper recipes' run.sh call this.
#
# Exit status: allo's, or 75 (EX_TEMPFAIL) when SIGTERM/SIGUSR1 stopped the run after a checkpoint: requeue and run
# the same command again to resume. (torchrun reports a worker's 75 as a plain failure, 1; allo.torchrun reports the
# first failed worker's status; this script reads the preemption marker the workers write, ALLO_PREEMPT_MARKER, to
# be sure.)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/slurm/usage.sh" && usage_if_asked "$0" "$@"
recipe=${1:?usage: run_one_node.sh RECIPE [--dry-run] [allo run options]}; shift
dry=0 args=()
for arg in "$@"; do  # --dry-run anywhere on the line
  if [ "$arg" = --dry-run ]; then dry=1; else args+=("$arg"); fi
done
set -- ${args[@]+"${args[@]}"}
python=${ALLO_PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3
gpus=${ALLO_GPUS:-$("$python" -c 'import torch; print(torch.cuda.device_count())')}
if [ "$gpus" -lt 1 ]; then
  echo "no GPU found: running 1 CPU process (set ALLO_GPUS to override)" >&2
  gpus=1
fi
"$python" -m allo.launch "$recipe" --nodes 1 --gpus-per-node "$gpus" || exit 2
cmd=("$python" -m allo.torchrun --standalone --nproc_per_node "$gpus" -m allo run "$recipe" "$@")
echo "command: ${cmd[*]}"
[ "$dry" = 1 ] && exit 0
cd "$here"
export ALLO_PREEMPT_MARKER=${ALLO_PREEMPT_MARKER:-${TMPDIR:-/tmp}/allo-preempted-$$}
rm -f "$ALLO_PREEMPT_MARKER"
source "$here/slurm/forward_signals.sh"
rc=0
run_forwarding "${cmd[@]}" || rc=$?
if [ -e "$ALLO_PREEMPT_MARKER" ]; then
  rm -f "$ALLO_PREEMPT_MARKER"
  echo "preempted after a checkpoint: exit 75; run the same command again to resume" >&2
  exit 75
fi
exit $rc
