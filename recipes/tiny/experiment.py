"""`make experiment`: does ALLO beat DPO on the tiny task when every method is tuned the same way, without the test
set? The demo's task (recipes/tiny/demo.py): arithmetic word problems whose SFT rationales carry a systematic
misconception ("gives away" worked as an addition in 60% of those steps), so the SFT model has an error mode that
preference pairs can fix.

1. Tune, on seed 0's development split only. Every method gets the same five grid points: its recipe learning
   rate times 1/3, 1, 3, 10 and 30 (ALLO: forget's and improve's together). One `allo run` per grid point with every
   method's rate scaled and task.eval = dev.jsonl; the pipeline reruns only the steps whose rate changed, and the
   eval. Seed 0's test file is written only after tuning, so tuning cannot read it.
2. Test, once: every method at its best development rate, seeds 0..N-1 (`--seeds`), greedy accuracy on each seed's
   test split: mean ± standard error over seeds, and ALLO − DPO per seed (paired) with its mean ± standard error.
   Writes runs/tiny/experiment/table.md (with the date, the commit and the wall time) and result.json.

Usage: python recipes/tiny/experiment.py [--seeds 0 1 2] [--quick] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
import demo  # noqa: E402

from allo.config import load_recipe  # noqa: E402

OUT = ROOT / "runs" / "tiny" / "experiment"
METHODS = {"+DPO": ("dpo",), "+NPO": ("npo",), "+SimPO": ("simpo",), "+ALLO": ("forget", "improve")}
GRID = (1 / 3, 1.0, 3.0, 10.0, 30.0)  # the same points for every method: factors on the recipe's learning rates


def base_rates(user_sets: list[str]) -> dict[str, float]:
    recipe = load_recipe(demo.RECIPE, user_sets)
    return {s: recipe.stage_train(s).lr for stages in METHODS.values() for s in stages}


def rate_sets(rates: dict[str, float]) -> list[str]:
    return [f"{stage}.train.lr={lr:.3g}" for stage, lr in rates.items()]


def prepare(seed: int, size: dict, with_test: bool, user_sets: list[str]) -> tuple[Path, list[str]]:
    """Seed's data (train, dev; test only when asked) and tokenizer; the run dir and its base `--set`s."""
    run = OUT / f"seed{seed}"
    template = load_recipe(demo.RECIPE, [*size["sets"], *user_sets]).data.template
    return run, demo.prepare_seed(run, seed, size, template, with_test)


def accuracies(run: Path) -> dict[str, float]:
    return json.loads((run / "eval" / "results.json").read_text())["accuracy"]


def tune(size: dict, user_sets: list[str]) -> dict:
    """Best grid point per method on seed 0's development split: {"dev": {label: {factor: acc}}, "best": ...}."""
    run, sets = prepare(0, size, with_test=False, user_sets=user_sets)
    base = base_rates(user_sets)
    dev: dict[str, dict[float, float]] = {label: {} for label in METHODS}
    for g in GRID:
        print(f"\n=== tuning, grid point ×{g:.3g} (development split)", flush=True)
        demo.allo("run", sets + [f"task.eval={run / 'data' / 'dev.jsonl'}", *user_sets,
                                 *rate_sets({s: lr * g for s, lr in base.items()})], ranks=size["ranks"])
        acc = accuracies(run)
        for label in METHODS:
            dev[label][g] = acc[label]
        dev.setdefault("SFT", {})[g] = acc["SFT"]
    best = {label: max(GRID, key=lambda g: (dev[label][g], -abs(math.log(g)))) for label in METHODS}  # ties: ×1
    rates = {s: base[s] * best[label] for label, stages in METHODS.items() for s in stages}
    return {"dev": dev, "best_factor": best, "rates": rates}


def test(size: dict, user_sets: list[str], rates: dict[str, float], seeds: list[int]) -> dict[int, dict[str, float]]:
    out = {}
    for seed in seeds:
        run, sets = prepare(seed, size, with_test=True, user_sets=user_sets)
        print(f"\n=== test, seed {seed}", flush=True)
        demo.allo("run", sets + [f"task.eval={run / 'data' / 'test.jsonl'}", *user_sets, *rate_sets(rates)],
                  ranks=size["ranks"])
        out[seed] = accuracies(run)
    return out


def mean_se(values: list[float]) -> str:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.1f} ± {se:.1f}"


def table(tuned: dict, results: dict[int, dict[str, float]], wall: float) -> str:
    seeds = sorted(results)
    lines = [f"Test accuracy % (greedy), mean ± standard error over seeds {', '.join(map(str, seeds))}; each method at "
             f"its best development-split learning rate (grid {', '.join(f'×{g:.3g}' for g in GRID)} of the recipe's)",
             "", f"| method | test accuracy | chosen lr factor | dev accuracy at {', '.join(f'×{g:.3g}' for g in GRID)} |",
             "|---|---|---|---|"]
    for label in ("SFT", *METHODS):
        accs = [100 * results[s][label] for s in seeds]
        factor = f"×{tuned['best_factor'][label]:.3g}" if label in METHODS else "–"
        dev = ", ".join(f"{100 * tuned['dev'][label][g]:.1f}" for g in GRID)
        lines.append(f"| {label} | {mean_se(accs)} | {factor} | {dev} |")
    diffs = [100 * (results[s]["+ALLO"] - results[s]["+DPO"]) for s in seeds]
    lines += ["", f"Paired, ALLO − DPO per seed: {', '.join(f'{d:+.1f}' for d in diffs)} (mean ± SE {mean_se(diffs)} "
              f"points; ALLO ahead on {sum(d > 0 for d in diffs)} of {len(diffs)} seeds)"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    lines += ["", f"{time.strftime('%Y-%m-%d')}, commit {commit}, wall time {wall / 60:.0f} min "
                  f"(`python recipes/tiny/experiment.py`)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="the demo's reduced sizes (a check of the script)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    size = dict(demo.SIZES["quick" if args.quick else "full"])
    size["ranks"] = demo.ranks(size["ranks"])
    t0 = time.time()
    tuned = tune(size, args.sets)
    results = test(size, args.sets, tuned["rates"], args.seeds)
    out = table(tuned, results, time.time() - t0)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "table.md").write_text(out + "\n")
    (OUT / "result.json").write_text(json.dumps({"tuning": tuned, "test": results}, indent=2, default=str))
    print("\n" + out)


if __name__ == "__main__":
    main()
