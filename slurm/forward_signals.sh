# Sourced by slurm/node.sh and recipes/run_one_node.sh. `run_forwarding CMD...` runs CMD (torchrun) and returns its
# exit status. torchrun has no SIGUSR1 handler (it would die and orphan its workers), so CMD starts with USR1
# ignored; the training processes install their own handler, which replaces the inherited "ignore". USR1 and TERM
# sent to this script alone are forwarded to CMD's children (the workers): they finish their step or unit of work,
# checkpoint and exit 75.
run_forwarding() {
  ( trap '' USR1; exec "$@" ) &
  local pid=$! rc
  trap "pkill -USR1 -P $pid" USR1
  trap "pkill -TERM -P $pid" TERM
  while true; do
    wait "$pid"
    rc=$?
    kill -0 "$pid" 2>/dev/null || break  # `wait` returned because a trap ran: keep waiting
  done
  trap - USR1 TERM
  return $rc
}
