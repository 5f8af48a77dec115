"""`allo sample`, `allo pairs` and greedy accuracy: problems -> labelled samples -> (correct, wrong) pairs.

A problem is {prompt, answer}. Samples are labelled with the same checker the eval uses (allo.tasks).
`sample_step` and `pairs_step` are the bodies of the pipeline's steps (declared in `allo.steps`).
"""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from allo.data.templates import render_prompt
from allo.config import GenerationConfig
from allo.generate import Sampling, generate, load_generator
from allo.io import read_jsonl, write_jsonl
from allo.sharding import run_sharded, unit_seed, units_of
from allo.steps import Context
from allo.tasks import is_correct

log = logging.getLogger(__name__)


def sample(model_dir: str, problems: Sequence[dict], template: str, sampling: Sampling, family: str = "math",
           tokenizer: Any = None, engine: Optional[GenerationConfig] = None, model: Any = None) -> list[dict]:
    """`sampling.n` labelled responses per problem. `model`/`tokenizer`: already loaded ones (`load_generator`)."""
    prompts = [render_prompt(p["prompt"], template, tokenizer) for p in problems]
    completions = generate(model_dir, prompts, sampling, engine, model=model, tokenizer=tokenizer,
                           progress=model is None)
    out = []
    for p, outs in zip(problems, completions):
        for text in outs:
            out.append({"prompt": p["prompt"], "response": text, "answer": p["answer"],
                        "correct": is_correct(text, p["answer"], family)})
    return out


def is_empty(sample: dict) -> bool:
    """A response with no text: nothing to prefer, forget or send to a teacher."""
    return not str(sample["response"]).strip()


def make_pairs(samples: Sequence[dict], max_per_problem: int = 5, seed: int = 0) -> tuple[list[dict], dict]:
    """Every (correct, wrong) combination per problem, at most `max_per_problem`, chosen with a seeded RNG. Empty
    responses are left out (counted: `empty_responses`)."""
    rng = random.Random(seed)
    by_problem: dict[str, dict[str, list]] = defaultdict(lambda: {"ok": [], "bad": []})
    for s in samples:
        group = by_problem[s["prompt"]]
        if not is_empty(s):
            group["ok" if s["correct"] else "bad"].append(s)
    pairs, no_pair = [], {"all_correct": 0, "all_wrong": 0}
    for prompt, group in by_problem.items():
        if not group["ok"] or not group["bad"]:
            no_pair["all_wrong" if not group["ok"] else "all_correct"] += 1
            continue
        ok, bad = _unique(group["ok"]), _unique(group["bad"])  # duplicate predictions pair once (reference code)
        combos = [(c, w) for c in ok for w in bad if c["response"] != w["response"]]
        for c, w in rng.sample(combos, min(max_per_problem, len(combos))):
            pairs.append({"prompt": prompt, "chosen": c["response"], "rejected": w["response"],
                          "answer": c["answer"]})
    stats = {"problems": len(by_problem), "pairs": len(pairs), "problems_without_pair": no_pair,
             "empty_responses": sum(map(is_empty, samples))}
    log.info("pairs: %d from %d problems; no pair for %d all-correct and %d all-wrong problems", len(pairs),
             len(by_problem), no_pair["all_correct"], no_pair["all_wrong"])
    return pairs, stats


def accuracy(model_dir: str, problems: Sequence[dict], template: str, family: str = "math",
             max_new_tokens: int = 64, engine: Optional[GenerationConfig] = None) -> float:
    """Greedy accuracy on held-out problems."""
    samples = sample(model_dir, problems, template, Sampling(n=1, temperature=0.0, max_new_tokens=max_new_tokens),
                     family, engine=engine)
    return sum(s["correct"] for s in samples) / max(1, len(samples))


def load_problems(path: Optional[str], key: str, limit: Optional[int] = None) -> list[dict]:
    """Problems {prompt, answer, reference?} from a records file (the first `limit`); the answer may be a number in
    the file."""
    from allo.data.records import DataError, read_records

    if not path:
        raise ValueError(f"{key} is not set in the recipe")
    records, _ = read_records(path, ("prompt",), optional=("answer", "reference", "response"), limit=limit)
    out = []
    for rec in records:
        if rec.get("answer") is None:
            raise DataError(f"{rec['source']}: missing field 'answer'")
        item = {"prompt": rec["prompt"], "answer": str(rec["answer"])}
        ref = rec.get("reference", rec.get("response"))
        if ref is not None:
            item["reference"] = ref
        out.append(item)
    return out


def sample_step(ctx: Context) -> Optional[dict]:
    """n labelled samples per training problem from the SFT model -> sample/samples.jsonl, sharded over the ranks
    (`allo.sharding`): unit k's seed comes from the recipe's seed and k alone, so any world size samples the same."""
    r, s = ctx.recipe, ctx.recipe.sample
    limits = [n for n in (r.data.limit, r.task.max_problems) if n is not None]
    problems = load_problems(r.task.problems, "task.problems", min(limits) if limits else None)
    loaded: list = []

    def work(k: int, idx: range) -> list[list[dict]]:
        if not loaded:  # once per rank, on the first unit it gets
            loaded.extend(load_generator(ctx.sft_model, r.generation))
        model, tok = loaded
        sub = [problems[i] for i in idx]
        rows = sample(ctx.sft_model, sub, r.data.template,
                      Sampling(n=s.n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                               seed=unit_seed(r.seed, k)), r.task.family, tok, r.generation, model)
        for row, problem in zip(rows, [p for p in sub for _ in range(s.n)]):
            if "reference" in problem:
                row["reference"] = problem["reference"]
        return [rows[j * s.n:(j + 1) * s.n] for j in range(len(sub))]

    units = units_of(len(problems), r.generation.batch_size // s.n)
    samples = run_sharded(ctx.sync, "sample", ctx.shards("sample"), units, work)
    if samples is None:
        return None
    write_jsonl(ctx.dir("sample") / "samples.jsonl", samples)
    n_ok = sum(x["correct"] for x in samples)
    log.info("sampled %d responses for %d problems: %d correct (%.1f%%)", len(samples), len(problems), n_ok,
             100 * n_ok / max(1, len(samples)))
    return {"problems": len(problems), "samples": len(samples), "correct": n_ok}


def _unique(samples: Sequence[dict]) -> list[dict]:
    """The first sample of each distinct response text, in order."""
    return list({s["response"]: s for s in reversed(samples)}.values())[::-1]


def unique_wrong(samples: Sequence[dict]) -> tuple[list[dict], dict]:
    """Every distinct wrong response of every problem, each once (the reference code's forget data), problems where
    every sample was wrong included, empty responses left out: {prompt, rejected, reference, answer}. The reference
    the teacher edits towards
    is the problem's reference solution, else its first right sample, else the bare gold answer."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_problem[s["prompt"]].append(s)
    rows, all_wrong, unpaired = [], 0, 0
    for prompt, group in by_problem.items():
        right = [s for s in group if s["correct"]]
        wrong = _unique([s for s in group if not s["correct"] and not is_empty(s)])
        if wrong and not right:
            all_wrong, unpaired = all_wrong + 1, unpaired + len(wrong)
        reference = next((s["reference"] for s in group if s.get("reference")), None) or (
            right[0]["response"] if right else f" The answer is {group[0]['answer']}.")
        rows += [{"prompt": prompt, "rejected": w["response"], "reference": reference, "answer": w["answer"]}
                 for w in wrong]
    stats = {"wrong_samples": sum(not s["correct"] and not is_empty(s) for s in samples), "unique_wrong": len(rows),
             "unique_wrong_all_wrong_problems": unpaired, "all_wrong_problems": all_wrong}
    return rows, stats


def wrong_of_pairs(pairs: Sequence[dict]) -> list[dict]:
    """Given pairs' distinct (prompt, rejected) responses, each once, with the chosen response (or the pair's
    reference) as what the teacher edits towards (docs/method.md §2, instruction following)."""
    import json

    seen: dict[str, dict] = {}
    for p in pairs:
        key = json.dumps([p["prompt"], p["rejected"]], sort_keys=True)
        seen.setdefault(key, {"prompt": p["prompt"], "rejected": p["rejected"],
                              "reference": p.get("reference", p["chosen"]), "answer": p.get("answer", "")})
    return list(seen.values())


def pairs_step(ctx: Context) -> dict:
    """(correct, wrong) pairs from the samples, or the recipe's own pairs (task.pairs) -> pairs/pairs.jsonl; and
    every distinct wrong response once -> pairs/wrong.jsonl (what reward-data, reward-score and npo read)."""
    from allo.guards import check_pairs

    r = ctx.recipe
    out = ctx.dir("pairs") / "pairs.jsonl"
    if r.task.pairs:
        return _given_pairs(ctx, out)
    samples = read_jsonl(ctx.path("sample/samples.jsonl"))
    reference = {x["prompt"]: x["reference"] for x in samples if "reference" in x}
    pairs, stats = make_pairs(samples, r.sample.max_pairs_per_problem, r.seed)
    if stats["empty_responses"]:
        log.info("pairs: %d of %d sampled responses are empty; left out of the pairs and of what the teacher and "
                 "forget see", stats["empty_responses"], len(samples))
    for p in pairs:
        if p["prompt"] in reference:
            p["reference"] = reference[p["prompt"]]
    write_jsonl(out, pairs)
    wrong, wrong_stats = unique_wrong(samples)
    write_jsonl(out.with_name("wrong.jsonl"), wrong)
    log.info("wrong responses to forget: %s", wrong_stats)
    check_pairs(stats, r.guards)
    return {**stats, **wrong_stats}


def _given_pairs(ctx: Context, out: Path) -> dict:
    """task.pairs, validated (data.columns / data.split / data.on_bad_record apply) into pairs/pairs.jsonl."""
    from allo.data.records import read_records

    from allo.guards import check_pairs

    d, path = ctx.recipe.data, ctx.recipe.task.pairs
    records, stats = read_records(path, split=d.split, subset=d.subset, columns=d.columns,
                                  on_bad_record=d.on_bad_record, optional=("reference", "answer"), limit=d.limit)
    rows = [{k: v for k, v in r.items() if k != "source"} for r in records]
    write_jsonl(out, rows)
    wrong = wrong_of_pairs(rows)
    write_jsonl(out.with_name("wrong.jsonl"), wrong)
    check_pairs({"pairs": len(rows)}, ctx.recipe.guards)
    return {"pairs": len(rows), "unique_wrong": len(wrong), "source": path, "read": stats.read,
            "skipped": dict(stats.skipped)}
