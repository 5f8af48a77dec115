"""Share of the training loop's py-spy samples spent in the masking code, from a raw py-spy profile.

Wall-clock ratios of two 2-rank runs on a shared 2-core machine swing by ±10% from run to run; the share of a
profile's samples that fall in a function is a steadier measure of what the masks cost. Record a profile of one
configuration (all ranks) and read it:
    py-spy record --subprocesses -r 100 -f raw -o /tmp/prof.txt -- \
        python bench/masked_step.py --only improve_dense_10 --steps 60
    python bench/profile_share.py /tmp/prof.txt
Prints the samples inside `Trainer.train`, those in `GradMasker.before_step` and `MaskedAdamW.step`, and the
optimizer's samples by source line (the masked update's line is the one that calls `keep_only`).
"""
from __future__ import annotations

import collections
import re
import sys


def shares(lines: list[str]) -> tuple[int, collections.Counter]:
    counts: collections.Counter = collections.Counter()
    train = 0
    for line in lines:
        stack, n = line.rsplit(" ", 1)
        if "train (allo/train.py" not in stack:
            continue
        train += int(n)
        if "before_step (allo/masks/apply.py" in stack:
            counts["GradMasker.before_step"] += int(n)
        lines_in_optim = re.findall(r"step \(allo/optim.py:(\d+)\)", stack)
        if lines_in_optim:
            counts["MaskedAdamW.step"] += int(n)
            counts[f"allo/optim.py:{lines_in_optim[-1]}"] += int(n)
    return train, counts


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as f:
        train, counts = shares([x for x in f if x.strip()])
    if not train:
        raise SystemExit(f"{sys.argv[1]}: no samples inside allo/train.py's train loop (a raw py-spy profile?)")
    print(f"samples in the train loop: {train}")
    for name, n in sorted(counts.items()):
        print(f"{name:32s} {n:6d}  {100 * n / train:5.1f}%")


if __name__ == "__main__":
    main()
