#!/bin/bash
# A real Slurm cluster on this host for tests: munge, slurmctld and NNODES slurmd daemons (Debian packages).
#   tests/slurm_local.sh up DIR [NNODES]   installs what is missing, writes DIR/slurm.conf, starts, waits idle
#   tests/slurm_local.sh down DIR          stops exactly the daemons `up` started
# Needs root. Config as measured in shared/notes/slurm_local_cluster.md.
set -euo pipefail
cmd=$1 D=$2 NNODES=${3:-2}
if [ "$cmd" = down ]; then
  for f in "$D"/run/slurmd-*.pid "$D"/run/slurmctld.pid; do [ -s "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null; done
  [ -e "$D/started-munged" ] && [ -s /run/munge/munged.pid ] && kill -TERM "$(cat /run/munge/munged.pid)" 2>/dev/null
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
[ -s /etc/munge/munge.key ] || { /usr/sbin/mungekey -c -f 2>/dev/null || create-munge-key -f; }
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge "$D"/{state,spool,log,run}
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
  touch "$D/started-munged"  # `down` stops munged only if `up` started it
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
H=$(hostname -s) CPUS=$(nproc)
mkdir -p /etc/slurm
{ cat <<EOC
ClusterName=allotest
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=5
Waittime=0
EOC
for n in $(seq 1 "$NNODES"); do
  echo "NodeName=n$n NodeHostname=$H NodeAddr=127.0.0.1 Port=$((17000 + n)) CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=2000 State=UNKNOWN"
done
echo "PartitionName=debug Nodes=n[1-$NNODES] Default=YES MaxTime=INFINITE State=UP"
} > /etc/slurm/slurm.conf
slurmctld -i
for n in $(seq 1 "$NNODES"); do slurmd -N "n$n"; done
for _ in $(seq 150); do [ "$(sinfo -h -t idle -o %D 2>/dev/null)" = "$NNODES" ] && exit 0; sleep 0.2; done
echo "slurm_local.sh: nodes did not become idle" >&2; sinfo >&2; exit 1
