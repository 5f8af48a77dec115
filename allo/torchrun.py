"""`python -m allo.torchrun [torchrun options] -m allo ...`: torchrun, with a failed worker reported in one line.

A worker that fails has already printed its one-line error (and written its traceback to the run's log); torchrun
itself would add a ChildFailedError traceback of about 40 lines. This prints which rank failed with which exit
status instead, and exits with that status (75 for a preemption, 2 for bad input), not torchrun's 1.
"""
from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its failure lines: said below
    try:
        run(args)
    except ChildFailedError as e:
        rank, first = e.get_first_failure()
        code = first.exitcode if 0 < first.exitcode < 256 else 1
        signal = f" ({first.signal_name()})" if first.exitcode < 0 else ""
        print(f"torchrun: rank {rank} failed first (exit {first.exitcode}{signal}); "
              f"{len(e.failures)} of {args.nproc_per_node} local worker(s) stopped", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
