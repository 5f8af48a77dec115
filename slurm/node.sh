#!/bin/bash
# One Slurm task per node: torchrun for this node's processes, running `allo ARGS` with this script's arguments
# exactly as given. c10d rendezvous at MASTER_ADDR:MASTER_PORT assigns node ranks itself (torchrun ignores
# --node-rank with c10d), so any node may start first.
#
# Signals: Slurm's --signal / `scancel --signal` reach every process of the step; forward_signals.sh keeps torchrun
# alive through SIGUSR1 and passes it on to the training processes. They checkpoint at the end of their step, exit
# 75, and slurm/allo.sbatch requeues the job.
#
# Gloo (CPU collectives, and the GPU jobs' side group) picks its network interface from the host name unless told:
# GLOO_SOCKET_IFNAME, else NCCL_SOCKET_IFNAME when it names interfaces (not a ^exclusion), else the interface this
# node routes MASTER_ADDR through.
source "$(dirname "$0")/usage.sh" && usage_if_asked "$0" "$@"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -z "${GLOO_SOCKET_IFNAME:-}" ]; then
  if [ -n "${NCCL_SOCKET_IFNAME:-}" ] && [ "${NCCL_SOCKET_IFNAME#^}" = "$NCCL_SOCKET_IFNAME" ]; then
    GLOO_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME#=}
  elif command -v ip >/dev/null; then
    GLOO_SOCKET_IFNAME=$(ip -o route get "$MASTER_ADDR" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n 1)
  fi
  [ -n "${GLOO_SOCKET_IFNAME:-}" ] && export GLOO_SOCKET_IFNAME
fi
echo "[allo] node $(hostname) task ${SLURM_PROCID:-0}: GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-(unset)}"
source "$(dirname "$0")/forward_signals.sh"
run_forwarding "${ALLO_PYTHON:-python}" -m allo.torchrun --nnodes="$SLURM_NNODES" \
  --nproc-per-node="$ALLO_PROCS_PER_NODE" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id="$SLURM_JOB_ID" -m allo "$@"
