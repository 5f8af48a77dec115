"""Learning-rate sweep behind the README's demo discussion, on the SFT model, pairs, token rewards and masks of
a finished `make demo` run (one seed):
- DPO and NPO (full parameters) from SFT at each --dpo / --npo learning rate;
- ALLO improve (N2) from the demo's forget model at each --improve learning rate;
- ALLO forget (N1) from SFT at each --forget learning rate, then improve from it at each --chain learning rate.

Usage: python recipes/tiny/sweep.py [--run runs/tiny/seed0] [--dpo ...] [--improve ...] [--forget ...] [--chain ...]
Prints greedy accuracy on the run's development split (RUN/data/dev.jsonl; never its test split) per (stage,
learning rate) and writes RUN/sweep/table.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from demo import allo  # noqa: E402

from allo.stages.sampling import accuracy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", default=str(ROOT / "runs" / "tiny" / "seed0"))
    p.add_argument("--dpo", type=float, nargs="*", default=[5e-6, 2e-5, 5e-5])
    p.add_argument("--improve", type=float, nargs="*", default=[3e-5, 1e-4, 3e-4])
    p.add_argument("--npo", type=float, nargs="*", default=[])
    p.add_argument("--forget", type=float, nargs="*", default=[])
    p.add_argument("--chain", type=float, nargs="*", default=[3e-4], help="improve lr after each --forget run")
    args = p.parse_args()
    run = Path(args.run)
    dev = [json.loads(x) for x in (run / "data" / "dev.jsonl").read_text().splitlines()]  # tuning: never the test split
    base = [f"output_dir={run}", f"model.tokenizer={run / 'tokenizer'}"]
    rows = [("SFT", "-", accuracy(str(run / "sft" / "model"), dev, "alpaca_cot"))]
    jobs = [("dpo", lr, str(run / "sft" / "model"), []) for lr in args.dpo]
    jobs += [("npo", lr, str(run / "sft" / "model"), []) for lr in args.npo]
    jobs += [("improve", lr, str(run / "forget" / "model"), ["--mask", str(run / "locate" / "n2.safetensors")])
             for lr in args.improve]
    for stage, lr, init, extra in jobs:
        out = run / "sweep" / f"{stage}_lr{lr:g}"
        allo(stage, base + [f"{stage}.train.lr={lr}"], "--data", str(run / "pairs" / "pairs.jsonl"), "--init", init,
             "--out", str(out), *extra)
        rows.append((stage, f"{lr:g}", accuracy(str(out / "model"), dev, "alpaca_cot")))
    pairs = str(run / "pairs" / "pairs.jsonl")
    for lr in args.forget:
        out = run / "sweep" / f"forget_lr{lr:g}"
        allo("forget", base + [f"forget.train.lr={lr}"], "--data", str(run / "reward-score" / "forget.jsonl"), "--init",
             str(run / "sft" / "model"), "--mask", str(run / "locate" / "n1.safetensors"), "--out", str(out))
        rows.append(("forget", f"{lr:g}", accuracy(str(out / "model"), dev, "alpaca_cot")))
        for lr2 in args.chain:
            out2 = run / "sweep" / f"forget_lr{lr:g}_improve_lr{lr2:g}"
            allo("improve", base + [f"improve.train.lr={lr2}"], "--data", pairs, "--init", str(out / "model"),
                 "--mask", str(run / "locate" / "n2.safetensors"), "--out", str(out2))
            rows.append(("forget → improve", f"{lr:g} → {lr2:g}", accuracy(str(out2 / "model"), dev, "alpaca_cot")))
    lines = ["| stage | lr | held-out accuracy % |", "|---|---|---|"]
    lines += [f"| {s} | {lr} | {100 * a:.1f} |" for s, lr, a in rows]
    print("\n".join(lines))
    (run / "sweep" / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
