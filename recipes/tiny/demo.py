"""`make demo`: the paper's comparison (SFT, +DPO, +NPO, +ALLO) reproduced from scratch on a tiny task, on CPU.

Stages, each printed with a banner and its wall time:
  data -> tokenizer -> sft -> sample -> pairs -> warmup (DPO) -> locate (N1, N2) -> reward-data (programmatic
  minimum-edit teacher) -> reward-train (SFT of a reward LM from the SFT weights) -> reward-score (keep-prob of
  every token of every wrong response) -> forget (N1) -> improve (N2) ; baselines dpo and npo from SFT
  -> greedy accuracy on held-out problems -> a table like the paper's Table 2, and `allo report` plots per seed.
Training stages run as `allo STAGE` under torchrun with 2 ranks and ZeRO-3 (ds_configs/zero3.json).

Usage: python recipes/tiny/demo.py [--seeds 0 1] [--quick] [--set KEY=VALUE ...]   (default: seeds 0 and 1)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "tiny" / "recipe.yaml"

from allo.config import load_recipe  # noqa: E402
from allo.data.templates import render  # noqa: E402
from allo.data.tokenize import encode_response  # noqa: E402
from allo.generate import Sampling  # noqa: E402
from allo.io import write_jsonl  # noqa: E402
from allo.model import train_tokenizer  # noqa: E402
from allo.reward.model import keep_probs, reward_data  # noqa: E402
from allo.reward.programmatic import keep_probs_from_diff, rewrite  # noqa: E402
from allo.tasks import is_correct  # noqa: E402
from allo.report import report  # noqa: E402
from allo.stages.locate import run_locate  # noqa: E402
from allo.stages.sampling import accuracy, make_pairs, sample  # noqa: E402
from allo.tasks.arith import make_splits  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

# The reward model reads (problem, reference, wrong) prompts: longer than the policy's.
REWARD_SETS = ["data.template=raw", "data.max_length=256", "data.max_prompt_length=200", "sft.train.epochs=2",
               "sft.train.lr=1e-3"]

SIZES = {"full": dict(sft=4000, rl=600, test=400, samples=4, ranks=2, sets=[]),
         # the test's reduced run: a weak SFT model gives few pairs, so every stage takes batches of 8
         "quick": dict(sft=600, rl=300, test=60, samples=4, ranks=2,
                       sets=["sft.train.epochs=3", "train.micro_batch_size=4"] + [f"{s}.train.global_batch_size=8" for s in
                                                     ("warmup", "forget", "improve", "dpo", "npo")])}


class Timer:
    def __init__(self):
        self.walls: dict[str, float] = {}

    def stage(self, name: str, what: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                print(f"\n=== [{name}] {what}", flush=True)
                self.t = time.time()

            def __exit__(self, *exc):
                timer.walls[name] = time.time() - self.t
                if exc[0] is None:
                    print(f"=== [{name}] done in {timer.walls[name]:.1f} s", flush=True)

        return _Ctx()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def allo(stage: str, sets: list[str], *extra: str, ranks: int = 2) -> None:
    """Run `allo STAGE` on `ranks` processes (torchrun); fails loudly with the command to rerun it by hand."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "allo", stage, str(RECIPE), *extra]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed (exit {proc.returncode}); rerun: {' '.join(cmd)}")


def run_seed(seed: int, size: dict, user_sets: list[str]) -> dict:
    run = ROOT / "runs" / "tiny" / f"seed{seed}"
    sets = [f"output_dir={run}", f"model.tokenizer={run / 'tokenizer'}", f"seed={seed}", *size["sets"], *user_sets]
    recipe = load_recipe(RECIPE, sets)
    T = Timer()
    template = recipe.data.template
    with T.stage("data", f"{size['sft']} SFT problems, {size['rl']} for sampling, {size['test']} held out"):
        sft_problems, test = make_splits(size["sft"], size["test"], seed=seed)
        rl_problems = sft_problems[: size["rl"]]
        write_jsonl(run / "data" / "sft.jsonl", sft_problems)
        write_jsonl(run / "data" / "test.jsonl", test)
    with T.stage("tokenizer", "byte-level BPE on the generated text"):
        texts = [render(p["prompt"], p["response"], template)[0] + p["response"] for p in sft_problems]
        tok = train_tokenizer(texts, 400, run / "tokenizer")
    with T.stage("sft", "a small Llama from scratch (2 ranks, ZeRO-3)"):
        allo("sft", sets, "--data", str(run / "data" / "sft.jsonl"), ranks=size["ranks"])
    sft_model = str(run / "sft" / "model")
    with T.stage("sample", f"{size['samples']} samples per problem, T=0.7, top-p 0.95"):
        samples = sample(sft_model, rl_problems, template,
                         Sampling(n=size["samples"], temperature=0.7, top_p=0.95, max_new_tokens=64, seed=seed))
        write_jsonl(run / "data" / "samples.jsonl", samples)
    with T.stage("pairs", "(correct, wrong) pairs, at most 5 per problem"):
        pairs, pair_stats = make_pairs(samples, 5, seed)
        write_jsonl(run / "data" / "pairs.jsonl", pairs)
    pairs_file = str(run / "data" / "pairs.jsonl")
    with T.stage("warmup", "plain DPO from SFT, all parameters: the run that ranks the neurons"):
        allo("warmup", sets, "--data", pairs_file, "--init", sft_model, ranks=size["ranks"])
    with T.stage("locate", f"N1 top {recipe.locate.forget_ratio}%, N2 top {recipe.locate.improve_ratio}%"):
        masks = run_locate(recipe, base=sft_model)
    reference = {p["prompt"]: p["response"] for p in sft_problems}
    items = [{"prompt": p["prompt"], "wrong": p["rejected"], "reference": reference[p["prompt"]],
              "answer": p["answer"]} for p in pairs]
    with T.stage("reward-data", "programmatic teacher: minimum-edit rewrites of the wrong responses"):
        rm_records, counts = reward_data(items, rewrite, is_correct)
        write_jsonl(run / "data" / "reward.jsonl", rm_records)
        print(f"reward data: {counts}")
    with T.stage("reward-train", "SFT of the token reward model on (rewrite prompt -> rewrite)"):
        allo("sft", sets + REWARD_SETS, "--data", str(run / "data" / "reward.jsonl"), "--init", sft_model,
             "--out", str(run / "reward"), ranks=size["ranks"])
    with T.stage("reward-score", "keep-probability of every token of every wrong response"):
        rm = AutoModelForCausalLM.from_pretrained(str(run / "reward" / "model"), dtype=torch.float32)
        probs = keep_probs(rm, tok, items, template)
        forget = [{"prompt": it["prompt"], "rejected": it["wrong"], "keep_probs": p} for it, p in zip(items, probs)]
        write_jsonl(run / "data" / "forget.jsonl", forget)
        result_reward = _agreement(items, probs, tok, template)
        print(f"token reward: {result_reward}")
    with T.stage("forget", "token-weighted NPO on wrong responses, N1 only"):
        allo("forget", sets, "--data", str(run / "data" / "forget.jsonl"), "--init", sft_model,
             "--mask", str(masks["n1"]), ranks=size["ranks"])
    with T.stage("improve", "noise-masked DPO from the forget model, N2 only"):
        allo("improve", sets, "--data", pairs_file, "--init", str(run / "forget" / "model"),
             "--mask", str(masks["n2"]), ranks=size["ranks"])
    with T.stage("dpo", "baseline: full-parameter DPO from SFT"):
        allo("dpo", sets, "--data", pairs_file, "--init", sft_model, ranks=size["ranks"])
    with T.stage("npo", "baseline: sequence NPO on the wrong responses from SFT"):
        allo("npo", sets, "--data", pairs_file, "--init", sft_model, ranks=size["ranks"])
    rows = {"SFT": ("sft", None), "+DPO": ("dpo", "dpo"), "+NPO": ("npo", "npo"), "+ALLO": ("improve", None)}
    result = {"seed": seed, "pairs": pair_stats, "wall": T.walls, "accuracy": {}, "updated": {},
              "token_reward": result_reward}
    with T.stage("eval", f"greedy accuracy on {len(test)} held-out problems"):
        for label, (stage, _) in rows.items():
            result["accuracy"][label] = accuracy(str(run / stage / "model"), test, template)
    for label, (stage, _) in rows.items():
        manifest = json.loads((run / stage / "manifest.json").read_text())
        result["updated"][label] = manifest["trainable_fraction"]
    result["updated"]["+ALLO"] = f"N1 {_frac(run / 'forget')} / N2 {_frac(run / 'improve')}"
    result["wall"] = T.walls
    (run / "demo_result.json").write_text(json.dumps(result, indent=2))
    print("report plots: " + ", ".join(str(p.relative_to(ROOT)) for p in report(run)))
    return result


def _agreement(items: list[dict], probs: list[list[float]], tok, template: str) -> dict:
    """How the reward model's unaligned tokens (p < 0.5) compare with the tokens the teacher actually edited."""
    tp = fp = fn = total = 0
    for it, p in zip(items, probs):
        wrong_ids = encode_response(tok, render(it["prompt"], it["wrong"], template)[1])
        fixed = rewrite(it["prompt"], it["wrong"], it["reference"])
        edited = [k == 0.0 for k in keep_probs_from_diff(wrong_ids, encode_response(tok, fixed))]
        flagged = [x < 0.5 for x in p]
        tp += sum(a and b for a, b in zip(flagged, edited))
        fp += sum(a and not b for a, b in zip(flagged, edited))
        fn += sum(b and not a for a, b in zip(flagged, edited))
        total += len(p)
    return {"tokens": total, "flagged_fraction": round((tp + fp) / max(1, total), 4),
            "precision_vs_teacher": round(tp / max(1, tp + fp), 4), "recall_vs_teacher": round(tp / max(1, tp + fn), 4)}


def _frac(stage_dir: Path) -> str:
    return f"{100 * json.loads((stage_dir / 'manifest.json').read_text())['trainable_fraction']:.1f}%"


def table(results: list[dict]) -> str:
    lines = ["| method | held-out accuracy % (mean ± std over seeds) | parameters updated |",
             "|---|---|---|"]
    for label in ("SFT", "+DPO", "+NPO", "+ALLO"):
        accs = [100 * r["accuracy"][label] for r in results]
        spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
        upd = results[0]["updated"][label]
        upd = f"{100 * upd:.1f}%" if isinstance(upd, float) else upd
        lines.append(f"| {label} | {statistics.mean(accs):.1f}{spread} | {upd if label != 'SFT' else '100% (sft)'} |")
    walls = {k: statistics.mean(r["wall"][k] for r in results) for k in results[0]["wall"]}
    lines.append("")
    lines.append("wall time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in walls.items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="two seeds fit the 10-minute budget")
    p.add_argument("--quick", action="store_true", help="fewer problems and epochs (the test's reduced run)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    t0 = time.time()
    results = [run_seed(s, size, args.sets) for s in args.seeds]
    out = table(results)
    (ROOT / "runs" / "tiny" / "table.md").write_text(out + "\n")
    print("\n" + out)
    print(f"\ntotal wall time {time.time() - t0:.0f} s; table written to runs/tiny/table.md")


if __name__ == "__main__":
    main()
