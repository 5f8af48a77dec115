"""Preemption: SIGTERM and SIGUSR1 (what Slurm sends before preemption or the time limit) set a flag that the
training loop and the sharded steps check at their safe points (an optimizer step, a unit of work); they then
save what they have and exit with EXIT_REQUEUE, which the launchers turn into a requeue."""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)
EXIT_REQUEUE = 75  # EX_TEMPFAIL: "try again"; slurm/ launchers requeue on it


def stop_on_signal(owner: Any, then: str) -> None:
    """On SIGTERM or SIGUSR1, set `owner.stop_requested` and log what happens next (`then`)."""
    def handler(signum, _frame):
        owner.stop_requested = True
        log.warning("received %s: %s", signal.Signals(signum).name, then)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def write_preempted(out_dir: Path, marker: dict, configured: Optional[str]) -> None:
    """`OUT/preempted.json`, and the file a launcher reads to decide on a requeue: ALLO_PREEMPT_MARKER (what
    slurm/allo.sbatch sets per job), else `train.preempt_marker` (`configured`)."""
    from allo.io import write_json

    write_json(Path(out_dir) / "preempted.json", marker)
    extra = os.environ.get("ALLO_PREEMPT_MARKER") or configured
    if extra:
        write_json(Path(extra), marker)
