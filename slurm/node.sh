#!/bin/bash
# One Slurm task per node: torchrun for this node's processes. c10d rendezvous at MASTER_ADDR:MASTER_PORT
# assigns node ranks itself (torchrun ignores --node-rank with c10d), so any node may start first.
#
# Signals: Slurm's --signal / `scancel --signal` reach every process of the step, torchrun included, and
# torchrun has no SIGUSR1 handler (it would die and orphan its workers). So torchrun starts with USR1 ignored;
# the training processes install their own handler (which replaces the inherited "ignore"), and this script
# also forwards USR1/TERM to them in case only the task's main process is signalled. They checkpoint at the
# end of their step, exit 75, and slurm/allo.sbatch requeues the job.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
(
  trap '' USR1
  exec ${ALLO_PYTHON:-python} -m torch.distributed.run --nnodes="$SLURM_NNODES" \
    --nproc-per-node="$ALLO_PROCS_PER_NODE" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id="$SLURM_JOB_ID" -m allo $ALLO_ARGS
) &
pid=$!
trap 'pkill -USR1 -P "$pid"' USR1
trap 'pkill -TERM -P "$pid"' TERM
while true; do
  wait "$pid"
  rc=$?
  kill -0 "$pid" 2>/dev/null || break  # `wait` returned because a trap ran: keep waiting
done
exit $rc
