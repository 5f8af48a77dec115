"""Every performance figure of the project, each measured side by side in one run and reported as a ratio.

  1. DPO throughput: `allo dpo` vs TRL's DPOTrainer on the same tiny Llama, pairs, max length, batch and fp32, one
     process each with the same thread count (goal: ours >= 1.0x TRL's); ALLO's masked improve stage (10% mask)
     vs our plain DPO (goal: >= 0.95x).
  2. Reference cost: TRL with a live reference model vs TRL with precomputed reference log-probs (step time, peak
     memory); allo always precomputes them once, sharded over ranks, and caches them on disk.
  3. Optimizer state: Adam moments of dense masked AdamW vs sparse state at 5/10/20% masks (goal at 10%: <= 15% of
     dense), and peak process memory of each 2-rank ZeRO-3 run.
  4. Locate throughput vs a plain read of the same checkpoint files (goal >= 0.5 of the read bandwidth) and its
     peak RSS (goal < 2 x largest tensor + 1 GiB).
Figures 1-3 run each configuration in rounds of alternating order and keep the fastest run (three rounds for
1-2; five of 40 steps for figure 3's step times, whose goal is judged on the median round); the table also gives each
step-time ratio from the median round of each configuration. Prints a
table last and writes bench/results/run_all.json. `--quick` (under 5 minutes on 2 cores): fewer steps, one round
of everything, and a 0.17 B-parameter locate checkpoint instead of 1 B.
Usage: python bench/run_all.py [--quick] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import locate as locate_bench  # noqa: E402
import masked_step  # noqa: E402


def trl(tmp: Path, steps: int, precompute: bool, env: dict) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "trl_dpo.py"), "--model", str(tmp / "model"), "--pairs",
           str(tmp / "pairs.jsonl"), "--out", str(tmp / "trl"), "--steps", str(steps), "--batch", "8"]
    out = subprocess.run(cmd + (["--precompute"] if precompute else []), cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads([x for x in out.splitlines() if x.startswith('{"step_s"')][-1])


def ratios_of(res: dict) -> list[tuple[str, str, float, float | None, str]]:
    """(figure, ratio, value from each configuration's fastest round, value from its median round or None, goal)."""
    def med(name: str) -> float:  # median over the rounds of one configuration's step time
        return statistics.median(res["step_s_all"][name])

    ratios = [
        ("1", "allo DPO / TRL DPO (precomputed ref), pairs/s", res["allo_dpo"]["pairs_per_s"] /
         res["trl_precomputed"]["pairs_per_s"], med("trl_precomputed") / med("allo_dpo"), ">= 1.0"),
        ("1", "allo DPO / TRL DPO (live ref), pairs/s", res["allo_dpo"]["pairs_per_s"] /
         res["trl_live_reference"]["pairs_per_s"], med("trl_live_reference") / med("allo_dpo"), ">= 1.0"),
        ("1", "ALLO improve (10% mask) / allo DPO, pairs/s", res["allo_improve_10"]["pairs_per_s"] /
         res["allo_dpo"]["pairs_per_s"], med("allo_dpo") / med("allo_improve_10"), ">= 0.95"),
        ("2", "TRL live reference / precomputed, step time", res["trl_live_reference"]["step_s"] /
         res["trl_precomputed"]["step_s"], med("trl_live_reference") / med("trl_precomputed"), "(cost)"),
        ("2", "TRL live reference / precomputed, peak RSS", res["trl_live_reference"]["peak_rss_mb"] /
         res["trl_precomputed"]["peak_rss_mb"], None, "(cost)"),
    ]
    for r in (5, 10, 20):
        dense, sparse = res[f"zero3_improve_dense_{r}"], res[f"zero3_improve_sparse_{r}"]
        ratios.append(("3", f"sparse / dense Adam moments at {r}%", sparse["optim_state_mb"] / dense["optim_state_mb"],
                       None, "<= 0.15" if r == 10 else ""))
        ratios.append(("3", f"sparse / dense peak RSS (rank 0) at {r}%", sparse["peak_rss_mb"] / dense["peak_rss_mb"],
                       None, ""))
        ratios.append(("3", f"masked dense {r}% / DPO step time (ZeRO-3, 2 ranks)",
                       dense["step_s"] / res["zero3_dpo"]["step_s"], med(f"zero3_improve_dense_{r}") / med("zero3_dpo"),
                       "<= 1.05"))
    ratios.append(("3", "DPO under the 10% mask / DPO step time (masking alone)", res["zero3_dpo_masked_10"]["step_s"] /
                   res["zero3_dpo"]["step_s"], med("zero3_dpo_masked_10") / med("zero3_dpo"), "(cost)"))
    loc = res["locate"]
    ratios.append(("4", "locate / read bandwidth, files in page cache", loc["fraction_of_read_bandwidth"], None,
                   ">= 0.5"))
    if "cold" in loc:
        ratios.append(("4", "locate / read bandwidth, from storage", loc["cold"]["fraction_of_read_bandwidth"], None,
                       ">= 0.5"))
    peak = max(loc["locate"]["peak_rss_mb"], loc.get("cold", loc)["locate"]["peak_rss_mb"])
    ratios.append(("4", "locate peak RSS / (2 x largest tensor + 1 GiB)", peak / loc["rss_goal_mb"], None, "< 1.0"))
    return ratios


def table(ratios: list[tuple[str, str, float, float | None, str]]) -> str:
    rows = ["| # | ratio | value (fastest rounds) | median rounds | goal |", "|---|---|---|---|---|"]
    rows += [f"| {fig} | {name} | {value:.3f} | {'' if median is None else f'{median:.3f}'} | {goal} |"
             for fig, name, value, median, goal in ratios]
    return "\n" + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each single-process run (figure 1, 2)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "run_all.json"))
    args = p.parse_args()
    steps, rounds = (12, 1) if args.quick else (60, 3)
    steps3, rounds3 = (12, 1) if args.quick else (40, 5)
    one = dict(masked_step.ENV, OMP_NUM_THREADS=str(args.threads))
    res: dict = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "threads": args.threads}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = masked_step.build(tmp)
        allo = masked_step.figure1_runs(tmp, model, steps, one)
        # 1 + 2: one process each
        masked_step.fastest(res, {
            "trl_precomputed": lambda r: trl(tmp, steps, True, one), "allo_dpo": allo["allo_dpo"],
            "trl_live_reference": lambda r: trl(tmp, steps, False, one), "allo_improve_10": allo["allo_improve_10"]},
            rounds)
        # 3: 2 ranks, ZeRO-3
        # figure 3's step times: the median of 5 alternating rounds (dense masked runs, DPO, DPO under the mask);
        # the sparse runs measure bytes, which do not vary, in one round
        z3 = masked_step.configs(tmp, model, steps3, masked_step.CONFIGS)
        masked_step.fastest(res, {f"zero3_{n}": f for n, f in z3.items() if "sparse" not in n}, rounds3)
        masked_step.fastest(res, {f"zero3_{n}": f for n, f in z3.items() if "sparse" in n}, 1)
    # 4
    res["locate"] = locate_bench.measure(1e8 if args.quick else 1e9, Path(tempfile.gettempdir()) / "allo_locate_bench")
    res["wall_s"] = round(time.time() - t0, 1)

    ratios = ratios_of(res)
    res["ratios"] = {name: value for _, name, value, _, _ in ratios}
    res["ratios_median_rounds"] = {name: value for _, name, _, value, _ in ratios if value is not None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\nraw figures in {args.out}; wall time {res['wall_s']} s")
    print(table(ratios))


if __name__ == "__main__":
    main()
