"""Preemption: SIGTERM and SIGUSR1 (what Slurm sends before preemption or the time limit) set a flag that the
training loop and the sharded steps check at their safe points (an optimizer step, a unit of work); they then
save what they have and exit with EXIT_REQUEUE, which the launchers turn into a requeue."""
from __future__ import annotations

import logging
import signal
from typing import Any

log = logging.getLogger(__name__)
EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again"; slurm/ launchers requeue on it


def stop_on_signal(owner: Any, then: str) -> None:
    """On SIGTERM or SIGUSR1, set `owner.stop_requested` and log what happens next (`then`)."""
    def handler(signum, _frame):
        owner.stop_requested = True
        log.warning("received %s: %s", signal.Signals(signum).name, then)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)
