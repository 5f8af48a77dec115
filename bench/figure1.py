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
        mask10 = str(masked_step.mask(model, 10, tmp / "m10.safetensors"))
        single = dict(nproc=1, micro=8, global_batch=8, weight_decay=0.0, ds_config="ds_configs/zero0.json",
                      env=dict(masked_step.ENV, OMP_NUM_THREADS=str(args.threads)))
        res: dict = {}
        masked_step.fastest(res, {
            "allo_dpo": lambda r: masked_step.run(tmp, f"dpo{r}", "dpo", args.steps, [], **single),
            "allo_improve_10": lambda r: masked_step.run(tmp, f"improve{r}", "improve", args.steps,
                                                         ["--mask", mask10], **single)}, args.rounds)
    dpo, improve = res["step_s_all"]["allo_dpo"], res["step_s_all"]["allo_improve_10"]
    print(f"step s, DPO: {[round(x, 4) for x in dpo]}; improve: {[round(x, 4) for x in improve]}")
    print(f"improve / DPO pairs/s: {min(dpo) / min(improve):.3f} (fastest rounds), "
          f"{statistics.median(dpo) / statistics.median(improve):.3f} (median rounds); goal >= 0.95")


if __name__ == "__main__":
    main()
