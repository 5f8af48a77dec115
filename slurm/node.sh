#!/bin/bash
# One Slurm task per node: torchrun for this node's processes, running `allo ARGS` with this script's arguments
# exactly as given. c10d rendezvous at MASTER_ADDR:MASTER_PORT assigns node ranks itself (torchrun ignores
# --node-rank with c10d), so any node may start first.
#
# Signals: Slurm's --signal / `scancel --signal` reach every process of the step; forward_signals.sh keeps torchrun
# alive through SIGUSR1 and passes it on to the training processes. They checkpoint at the end of their step, exit
# 75, and slurm/allo.sbatch requeues the job.
source "$(dirname "$0")/usage.sh" && usage_if_asked "$0" "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
source "$(dirname "$0")/forward_signals.sh"
run_forwarding "${ALLO_PYTHON:-python}" -m allo.torchrun --nnodes="$SLURM_NNODES" \
  --nproc-per-node="$ALLO_PROCS_PER_NODE" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id="$SLURM_JOB_ID" -m allo "$@"
