#!/bin/bash
# One node: `allo run RECIPE` on every GPU of this machine (torchrun), after checking everything it will need.
#
#   recipes/run_one_node.sh RECIPE [--dry-run] [allo run options: --from STEP, --only STEP, --set KEY=VALUE ...]
#
# Before anything runs, and with --dry-run (anywhere) too, it runs the whole pre-flight at this node's world size
# with the allo run options (--set values included): every input file, the teacher's and the judge's API keys, the
# chat template, every step's batch arithmetic; it prints every problem with its fix and exits 2. --dry-run then
# prints the command and runs nothing. -h/--help: this text.
#
# Python: $ALLO_PYTHON, else .venv-gpu (`make install-gpu`), else .venv (`make install`, CPU torch); it says which.
# GPUs are counted with that Python's torch (set ALLO_GPUS to override, e.g. to use fewer); on a machine with GPUs,
# a CPU-only torch is refused. Without a GPU it runs 1 process on the CPU (tiny recipes only). It runs in the
# current directory: relative paths (the recipe, data, output_dir) resolve there. The paper recipes' run.sh call
# this.
#
# Exit status: allo's, or 75 (EX_TEMPFAIL) when SIGTERM/SIGUSR1 stopped the run after a checkpoint: requeue and run
# the same command again to resume. (torchrun reports a worker's 75 as a plain failure, 1; allo.torchrun reports the
# first failed worker's status; this script reads the preemption marker the workers write, ALLO_PREEMPT_MARKER, to
# be sure.)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
source "$here/slurm/usage.sh" && usage_if_asked "$0" "$@"
source "$here/slurm/python.sh"
recipe=${1:?usage: run_one_node.sh RECIPE [--dry-run] [allo run options]}; shift
dry=0 args=()
for arg in "$@"; do  # --dry-run anywhere on the line
  if [ "$arg" = --dry-run ]; then dry=1; else args+=("$arg"); fi
done
set -- ${args[@]+"${args[@]}"}
choose_python "$here"
echo "python: $python ($python_why)"
seen=$("$python" -c 'import torch; print(torch.cuda.device_count())')
gpus=${ALLO_GPUS:-$seen}
gpu=()  # GPUs on this machine (torch's count, or the driver's list): the Python's torch must be able to use them
if [ "$seen" -ge 1 ] || { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
  gpu=(--gpu)
fi
if [ "$gpus" -lt 1 ]; then
  echo "no GPU found: running 1 CPU process (set ALLO_GPUS to override)" >&2
  gpus=1
fi
"$python" -m allo.launch "$recipe" --nodes 1 --gpus-per-node "$gpus" ${gpu[@]+"${gpu[@]}"} -- "$@" || exit 2
cmd=("$python" -m allo.torchrun --standalone --nproc_per_node "$gpus" -m allo run "$recipe" "$@")
echo "command: $(quoted "${cmd[@]}")"
[ "$dry" = 1 ] && exit 0
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
