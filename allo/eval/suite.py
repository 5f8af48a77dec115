"""A run's evaluation (the pipeline's eval step): every model on every benchmark of the recipe, in the layouts of
the paper's Table 2 (QA / math accuracy) and Table 3 (instruction following, win rate against the SFT model's own
answers, judged in both orders)."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from allo.eval import benchmarks
from allo.config import GenerationConfig
from allo.eval.run import EVAL_SAMPLING, evaluate

log = logging.getLogger(__name__)


def slug(name: str) -> str:
    return name.strip("+").lower()


def table2(models: dict[str, str], task: Any, template: str, out_dir: Path,
           engine: Optional[GenerationConfig] = None) -> dict[str, dict[str, float]]:
    """{model: {benchmark: accuracy %}} plus QA / Math averages over the benchmarks present."""
    gen = replace(EVAL_SAMPLING, max_new_tokens=task.eval_max_new_tokens)
    table: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        row = table.setdefault(name, {})
        for spec in task.benchmarks:
            bench, _, data = spec.partition("=")
            row[bench] = evaluate(path, bench, str(out_dir / slug(name)), data or None, task.eval_limit, gen,
                                  template, engine)["accuracy"]
        for group in ("qa", "math"):
            accs = [row[b.partition("=")[0]] for b in task.benchmarks if benchmarks.get(b.partition("=")[0]).group == group]
            if accs:
                row[f"{group}_avg"] = round(sum(accs) / len(accs), 2)
    return table


def instruction_suites(task: Any) -> dict[str, list[str]]:
    """The instruction-following prompts every model answers for Table 3, by suite (first task.eval_limit)."""
    from allo.eval import instruct

    suites = {}
    if task.alpaca_eval:
        suites["alpaca_eval"] = [r["instruction"] for r in instruct.read_alpaca_outputs(task.alpaca_eval)]
    if task.arena_hard:
        suites["arena_hard"] = [q["prompt"] for q in instruct.read_arena_questions(task.arena_hard)]
    return {k: v[:task.eval_limit] if task.eval_limit else v for k, v in suites.items()}


def table3(models: dict[str, str], task: Any, out_dir: Path, answers: dict[str, dict[str, list[str]]],
           protocol: str = "swap", judge_key: str = "task.judge") -> dict[str, dict[str, float]]:
    """Win rate (%) of each model against the first model (the run's SFT model, or a suite's reference answers),
    judged by `task.judge`, from the models' `answers` ({suite: {model: answers}} to `instruction_suites`).
    AlpacaEval under `protocol` (swap: both orders, the paper's; official: one seeded random order); Arena-Hard
    always both orders, the leaderboard's setup."""
    from allo.eval import bradley_terry, instruct, judges
    from allo.openai_client import ChatClient

    client = ChatClient(task.judge.endpoint(judge_key), cache_dir=str(out_dir / "judge_cache"))
    suites = instruction_suites(task)
    arena = instruct.read_arena_questions(task.arena_hard) if task.arena_hard else []
    ci: dict[str, Any] = {}
    base = next(iter(models))
    table: dict[str, dict[str, float]] = {name: {} for name in models}
    for suite, by_model in answers.items():
        prompts = suites[suite][:len(by_model[base])]
        for name in models:
            if name == base:
                table[name][suite] = 50.0
            elif suite == "alpaca_eval":
                ann = judges.alpaca_pairs(client, prompts, by_model[base], by_model[name], base, name, protocol)
                table[name][suite] = round(judges.alpaca_score(ann)[0]["win_rate"], 2)
            else:  # the leaderboard's judge prompt per question category; the score with its bootstrap interval
                qs = [{**q, "uid": str(i)} for i, q in enumerate(arena[:len(prompts)])]
                games = judges.arena_games(client, qs, dict(zip(map(str, range(len(prompts))), by_model[base])),
                                           dict(zip(map(str, range(len(prompts))), by_model[name])))
                battles, groups, _ = judges.battles(games, name, base)
                score = bradley_terry.scores(battles, base, rounds=100, groups=groups)[name] if battles else None
                table[name][suite] = score["score"] if score else None
                ci[name] = score["ci95"] if score else None
    table["_judge"] = {"model": task.judge.model, "usage": client.usage.summary(client.ep)}
    if ci:
        table["_arena_hard_ci95"] = ci
    return table
