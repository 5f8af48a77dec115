"""`make demo`: the paper's comparison (SFT, +DPO, +NPO, +ALLO) reproduced from scratch on a tiny task, on the GPUs
when the machine has them and on the CPU otherwise.

Per seed: write the task's data (allo/tasks/arith.py), train a tokenizer on it and write RUN/recipe.yaml (the tiny
recipe with the seed's settings), then run the whole pipeline with `python -m allo.torchrun --nproc_per_node 2 -m allo
run RUN/recipe.yaml` (2 ranks, or one per GPU; ZeRO-3): sft -> sample ->
pairs -> warmup (DPO) -> locate (N1, N2) -> reward-data (programmatic minimum-edit teacher) -> reward-train ->
reward-score -> forget (N1) -> improve (N2) ; baselines dpo, npo and simpo -> eval (greedy held-out accuracy).
Ends with a table like the paper's Table 2 (mean ± std over seeds) and `allo report` plots per seed.

Usage: python recipes/tiny/demo.py [--seeds 0 1] [--quick] [--ranks N] [--out DIR] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "tiny" / "recipe.yaml"

from allo.config import load_recipe  # noqa: E402
from allo.data.templates import render  # noqa: E402
from allo.data.tokenize import encode_response  # noqa: E402
from allo.io import write_jsonl  # noqa: E402
from allo.launch import torchrun_command  # noqa: E402
from allo.model import train_tokenizer  # noqa: E402
from allo.steps import REGISTRY, STEPS  # noqa: E402
from allo.reward.programmatic import keep_probs_from_diff, rewrite  # noqa: E402
from allo.report import report  # noqa: E402
from allo.tasks.arith import MISCONCEPTIONS, make_splits  # noqa: E402


# The share of "gives away" steps that SFT rationales work as an addition (allo/tasks/arith.py): a systematic
# misconception the SFT model learns and sampling sometimes avoids, so preference pairs have something to fix.
MISCONCEPTION = 0.6
TASK = "gives-away"  # which misconception is planted (allo.tasks.arith.MISCONCEPTIONS; --task)
SIZES = {"full": dict(sft=4000, rl=600, dev=200, test=400, samples=4, ranks=2, sets=[]),
         # the test's reduced run: a weak SFT model gives few pairs, so the stages trained on pairs take batches of
         # 8 (its many wrong responses keep forget and npo at the recipe's batch); one reward-model epoch
         "quick": dict(sft=600, rl=200, dev=30, test=60, samples=4, ranks=2,
                       sets=["sft.train.epochs=3", "train.micro_batch_size=4", "reward.train.epochs=1"] + [
                           f"{s.train.section}.train.global_batch_size=8" for s in REGISTRY.values()
                           if s.train and s.train.data == "pairs/pairs.jsonl"])}


def allo(stage: str, sets: list[str], *extra: str, ranks: int = 2, recipe: Path = RECIPE,
         env: Optional[dict] = None) -> None:
    """Run `allo STAGE` on `ranks` processes (torchrun), with `env` added to the environment; fails loudly with the
    command to rerun it by hand."""
    cmd = torchrun_command([stage, str(recipe), *extra], ranks)
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))  # GPU when there is one
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed (exit {proc.returncode}); rerun: {' '.join(cmd)}")


def ranks(wanted: int) -> int:
    """`wanted` processes on the CPU; on a GPU machine one per GPU, at most `wanted` (NCCL needs a GPU per rank)."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus and wanted > gpus:
        print(f"{gpus} GPU(s) here: {gpus} rank(s) instead of {wanted}", flush=True)
    return min(wanted, gpus) if gpus else wanted


def device() -> str:
    import torch

    return f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU"


def run_seed(seed: int, size: dict, user_sets: list[str], out: Path) -> dict:
    run = out / f"seed{seed}"
    recipe = load_recipe(RECIPE, [*size["sets"], *user_sets])
    t0 = time.time()
    print(f"\n=== seed {seed}: data ({size['sft']} SFT problems, {size['rl']} sampled on, {size['test']} held out) "
          f"and tokenizer", flush=True)
    sets = prepare_seed(run, seed, size, recipe.data.template) + [f"task.eval={run / 'data' / 'test.jsonl'}",
                                                                  *user_sets]
    run_recipe = write_run_recipe(run, sets, size["ranks"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    walls = {"data+tokenizer": time.time() - t0}
    print(f"=== seed {seed}: allo run ({size['ranks']} ranks, ZeRO-3, {device()})", flush=True)
    allo("run", [], ranks=size["ranks"], recipe=run_recipe)
    for step in STEPS:
        manifest = json.loads((run / step / "manifest.json").read_text())
        if "wall_s" in manifest:
            walls[step] = manifest["wall_s"]
    accuracy = json.loads((run / "eval" / "results.json").read_text())["accuracy"]
    updated = {label: json.loads((run / stage / "manifest.json").read_text())["trainable_fraction"]
               for label, stage in (("+DPO", "dpo"), ("+NPO", "npo"), ("+SimPO", "simpo"))}
    updated["SFT"] = 1.0
    updated["+ALLO"] = f"N1 {_frac(run / 'forget')} / N2 {_frac(run / 'improve')}"
    pairs = [json.loads(x) for x in (run / "pairs" / "pairs.jsonl").read_text().splitlines()]
    scored = [json.loads(x) for x in (run / "reward-score" / "forget.jsonl").read_text().splitlines()]
    items = [{"prompt": p["prompt"], "wrong": p["rejected"], "reference": p.get("reference", p["chosen"])}
             for p in pairs]
    result = {"seed": seed, "accuracy": accuracy, "updated": updated, "wall": walls,
              "by_kind": by_kind(run, list(accuracy), size.get("task", TASK)),
              "token_reward": _agreement(items, [r["keep_probs"] for r in scored], tok, recipe.data.template)}
    print(f"token reward vs teacher edits: {result['token_reward']}")
    (run / "demo_result.json").write_text(json.dumps(result, indent=2))
    print("report plots: " + ", ".join(str(p) for p in report(run)))
    return result


def write_run_recipe(run: Path, sets: list[str], ranks: int) -> Path:
    """RUN/recipe.yaml: the tiny recipe with this seed's settings written in, so that the run can be continued and
    ablated by hand (`allo run RUN/recipe.yaml --from STEP`, `allo ablate RUN/recipe.yaml`)."""
    import yaml

    from allo.config import read_yaml

    data, _ = read_yaml(RECIPE, sets)  # the YAML with the --set values in place (not the resolved recipe: which
    path = run / "recipe.yaml"         # train keys a recipe sets decides how the stages' own defaults apply)
    launch = f"python -m allo.torchrun --nproc_per_node {ranks} -m allo"
    header = (f"# The run of recipes/tiny/demo.py in {run}: recipes/tiny/recipe.yaml with the demo's settings.\n"
              f"# Continue it:  {launch} run {path} --from STEP\n"
              f"# Ablate it:    {launch} ablate {path} --without forget\n")
    text = header + yaml.safe_dump(data, sort_keys=False)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    load_recipe(path)  # the file must stand on its own
    return path


def prepare_seed(run: Path, seed: int, size: dict, template: str, with_test: bool = True) -> list[str]:
    """A seed's data under RUN/data (train and dev; the test split only when asked, so tuning can run before it
    exists) and its tokenizer; returns the run's base `--set`s (no task.eval)."""
    data = run / "data"
    sft_problems, dev, test = make_splits(size["sft"], size["test"], seed=seed, n_dev=size["dev"],
                                          misconception=MISCONCEPTION, kind=size.get("task", TASK))
    changed = write_data(data, sft_problems, dev, size["rl"])
    if with_test:
        _write_if_changed(data / "test.jsonl", [{"prompt": p["prompt"], "answer": p["answer"]} for p in test])
    if changed or not (run / "tokenizer" / "tokenizer.json").exists():
        texts = [render(p["prompt"], p["taught"], template)[0] + p["taught"] for p in sft_problems]
        train_tokenizer(texts, 400, run / "tokenizer")
    return [f"output_dir={run}", f"model.tokenizer={run / 'tokenizer'}", f"seed={seed}",
            f"task.sft_data={data / 'sft.jsonl'}", f"task.problems={data / 'problems.jsonl'}", *size["sets"]]


def write_data(data: Path, sft_problems: list[dict], dev: list[dict], rl: int) -> bool:
    """The task's training files and its development split: SFT records carry the taught (possibly flawed)
    rationale; the problems sampled on keep the correct one as the teacher's reference. True if any changed."""
    changed = _write_if_changed(data / "sft.jsonl", [{"prompt": p["prompt"], "response": p["taught"]}
                                                     for p in sft_problems])
    changed |= _write_if_changed(data / "problems.jsonl", [
        {"prompt": p["prompt"], "answer": p["answer"], "reference": p["response"]} for p in sft_problems[:rl]])
    changed |= _write_if_changed(data / "dev.jsonl", [{"prompt": p["prompt"], "answer": p["answer"]} for p in dev])
    return changed


def _write_if_changed(path: Path, records: list[dict]) -> bool:
    """Write JSONL only when its content changes: `allo run` reruns a step whose input files changed."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path.exists() and path.read_text() == text:
        return False
    write_jsonl(path, records)
    return True


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


def planted_phrase(task: str) -> str:
    """The wording of the steps `task`'s misconception acts on (the null task: those the default task's acts on)."""
    m = MISCONCEPTIONS[task]
    return m.phrase or m.draws_on


def predictions(run: Path, label: str, task: str = "gives-away") -> list[dict]:
    """The eval step's per-problem results of one model: {correct, planted} per held-out problem, in order;
    `planted`: the problem has a step the task's misconception acts on (e.g. "gives away")."""
    from allo.eval.suite import slug

    phrase = planted_phrase(task)
    rows = (run / "eval" / slug(label) / "held-out.predictions.jsonl").read_text().splitlines()
    return [{"correct": bool(r["correct"]), "planted": phrase in r["prompt"]} for r in map(json.loads, rows)]


def by_kind(run: Path, labels: list[str], task: str = "gives-away") -> dict[str, dict[str, list[int]]]:
    """Per model, [correct, problems] on the held-out problems with a "gives away" step and on the rest: whether a
    gain comes from fixing the planted error."""
    out = {}
    for label in labels:
        rows = predictions(run, label, task)
        kinds = {"with": [r for r in rows if r["planted"]], "without": [r for r in rows if not r["planted"]]}
        out[label] = {k: [sum(r["correct"] for r in v), len(v)] for k, v in kinds.items()}
    return out


def table(results: list[dict], task: str = "gives-away") -> str:
    lines = [f"| method | held-out accuracy % (mean ± std over seeds) | with a \"{planted_phrase(task)}\" step | "
             "without | parameters updated |", "|---|---|---|---|---|"]
    for label in ("SFT", "+DPO", "+NPO", "+SimPO", "+ALLO"):
        accs = [100 * r["accuracy"][label] for r in results]
        spread = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
        upd = results[0]["updated"][label]
        upd = f"{100 * upd:.1f}%" if isinstance(upd, float) else upd
        kinds = []
        for kind in ("with", "without"):  # pooled over seeds
            right, n = (sum(r["by_kind"][label][kind][i] for r in results) for i in (0, 1))
            kinds.append(f"{100 * right / max(1, n):.1f} (of {n})")
        lines.append(f"| {label} | {statistics.mean(accs):.1f}{spread} | {kinds[0]} | {kinds[1]} | {upd} |")
    walls = {k: statistics.mean(r["wall"][k] for r in results) for k in results[0]["wall"]}
    lines.append("")
    lines.append("wall time per step (s, mean over seeds): " + ", ".join(f"{k} {v:.1f}" for k, v in walls.items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="two seeds fit the 10-minute budget")
    p.add_argument("--quick", action="store_true", help="fewer problems and epochs (the test's reduced run)")
    p.add_argument("--ranks", type=int, help="processes (default 2; on a GPU machine at most its GPU count)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--task", default=TASK, choices=list(MISCONCEPTIONS),
                   help=f"the planted misconception (default {TASK}; none: the null task): " +
                        "; ".join(f"{m.name}: {m.about}" for m in MISCONCEPTIONS.values()))
    p.add_argument("--out", type=Path, help="where the runs and table.md go (default runs/tiny, with --quick "
                                            "runs/tiny-quick: a quick run never overwrites a full one)")
    args = p.parse_args()
    out = (args.out or ROOT / "runs" / ("tiny-quick" if args.quick else "tiny")).resolve()
    size = dict(SIZES["quick" if args.quick else "full"])
    size["ranks"] = ranks(args.ranks or size["ranks"])
    size["task"] = args.task
    t0 = time.time()
    results = [run_seed(s, size, args.sets, out) for s in args.seeds]
    text = table(results, args.task)
    (out / "table.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\ntotal wall time {time.time() - t0:.0f} s; table written to {out / 'table.md'}")


if __name__ == "__main__":
    main()
