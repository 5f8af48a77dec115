"""Figure 1's last ratio alone: ALLO's improve stage (10% mask) over plain DPO, pairs/s, one process, ZeRO-0, the
configuration `run_all.py` uses, in alternating rounds (a quick re-measure when `make bench` ran on a busy machine).

    python bench/figure1.py [--rounds 3] [--steps 60]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import masked_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = masked_step.build(tmp)
        res: dict = {}
        masked_step.fastest(res, masked_step.figure1_runs(
            tmp, model, args.steps, dict(masked_step.ENV, OMP_NUM_THREADS=str(args.threads))), args.rounds)
    dpo, improve = res["step_s_all"]["allo_dpo"], res["step_s_all"]["allo_improve_10"]
    print(f"step s, DPO: {[round(x, 4) for x in dpo]}; improve: {[round(x, 4) for x in improve]}")
    print(f"improve / DPO pairs/s: {min(dpo) / min(improve):.3f} (fastest rounds), "
          f"{statistics.median(dpo) / statistics.median(improve):.3f} (median rounds); goal >= 0.95")


if __name__ == "__main__":
    main()
