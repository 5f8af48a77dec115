"""`allo sample`, `allo pairs` and greedy accuracy: problems -> labelled samples -> (correct, wrong) pairs.

A problem is {prompt, answer}. Samples are labelled with the same checker the eval uses (allo.tasks).
"""
from __future__ import annotations

import logging
import random
from collections import defaultdict
from typing import Any, Sequence

from allo.data.templates import render_prompt
from allo.generate import Sampling, generate
from allo.tasks import is_correct

log = logging.getLogger(__name__)


def sample(model_dir: str, problems: Sequence[dict], template: str, sampling: Sampling, family: str = "math",
           tokenizer: Any = None) -> list[dict]:
    prompts = [render_prompt(p["prompt"], template, tokenizer) for p in problems]
    completions = generate(model_dir, prompts, sampling)
    out = []
    for p, outs in zip(problems, completions):
        for text in outs:
            out.append({"prompt": p["prompt"], "response": text, "answer": p["answer"],
                        "correct": is_correct(text, p["answer"], family)})
    n_ok = sum(s["correct"] for s in out)
    log.info("sampled %d responses for %d problems: %d correct (%.1f%%)", len(out), len(problems), n_ok,
             100 * n_ok / max(1, len(out)))
    return out


def make_pairs(samples: Sequence[dict], max_per_problem: int = 5, seed: int = 0) -> tuple[list[dict], dict]:
    """Every (correct, wrong) combination per problem, at most `max_per_problem`, chosen with a seeded RNG."""
    rng = random.Random(seed)
    by_problem: dict[str, dict[str, list]] = defaultdict(lambda: {"ok": [], "bad": []})
    for s in samples:
        by_problem[s["prompt"]]["ok" if s["correct"] else "bad"].append(s)
    pairs, no_pair = [], {"all_correct": 0, "all_wrong": 0}
    for prompt, group in by_problem.items():
        if not group["ok"] or not group["bad"]:
            no_pair["all_wrong" if not group["ok"] else "all_correct"] += 1
            continue
        combos = [(c, w) for c in group["ok"] for w in group["bad"] if c["response"] != w["response"]]
        for c, w in rng.sample(combos, min(max_per_problem, len(combos))):
            pairs.append({"prompt": prompt, "chosen": c["response"], "rejected": w["response"],
                          "answer": c["answer"]})
    stats = {"problems": len(by_problem), "pairs": len(pairs), "problems_without_pair": no_pair}
    log.info("pairs: %d from %d problems; no pair for %d all-correct and %d all-wrong problems", len(pairs),
             len(by_problem), no_pair["all_correct"], no_pair["all_wrong"])
    return pairs, stats


def accuracy(model_dir: str, problems: Sequence[dict], template: str, family: str = "math",
             max_new_tokens: int = 64) -> float:
    """Greedy accuracy on held-out problems."""
    samples = sample(model_dir, problems, template, Sampling(n=1, temperature=0.0, max_new_tokens=max_new_tokens),
                     family)
    return sum(s["correct"] for s in samples) / max(1, len(samples))
