"""Eval suite files (`eval/qa.yaml`, `eval/math.yaml`, `eval/instruct.yaml`) and `allo eval suite`: one paper table's
benchmarks, data, template, generation settings and judge in a file, run on any number of models.

Two phases, so a cluster job can spread the first over GPUs: `generate` (per model: every benchmark's
predictions, scored, and the answers to the instruction-following prompts; resumable batch by batch) and `judge`
(Table 3's judging against the reference answers or the first model, then the tables). Results land where
`allo report OUT` reads them: `OUT/eval/<label>/<benchmark>.result.json` and `OUT/eval/results.json`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

from allo.config import ConfigError, EndpointConfig, GenerationConfig, Tracker, knob, load_config
from allo.eval.benchmarks import WHERE, BenchmarkError, check_available
from allo.eval.suite import instruction_suites, slug



@dataclass
class Suite:
    name: str = knob("suite", "The table the suite fills (qa, math, instruct): its label in results and trackers.")
    benchmarks: list = knob(factory=list, help="QA / math benchmarks, `allo eval bench` names, each optionally "
                                               "NAME=FILE or NAME=HUB_NAME (eval/README.md).")
    template: Literal["alpaca_cot", "alpaca", "chat", "raw"] = knob(
        "alpaca_cot", "Prompt format (docs/method.md §6's Alpaca with \"Let's think step by step.\" for QA and math; the "
        "model's chat template for instruction following).")
    max_new_tokens: int = knob(512, "Greedy decoding budget per answer.", ge=1)
    limit: Optional[int] = knob(None, "First N problems / prompts of each benchmark only (quick looks).", ge=1)
    generation: GenerationConfig = knob(factory=GenerationConfig)
    alpaca_eval: Optional[str] = knob(None, "An alpaca_eval outputs file (e.g. alpaca_eval_gpt4_baseline.json): every "
                                            "model answers its instructions; its outputs are the reference answers.")
    arena_hard: Optional[str] = knob(None, "An Arena-Hard question.jsonl (v0.1 or v2.0).")
    arena_baseline: Optional[str] = knob(None, "Arena-Hard's reference answers (a model_answer JSONL, e.g. "
                                               "gpt-4-0314.jsonl for v0.1), for baseline: reference.")
    baseline: Literal["reference", "first"] = knob(
        "reference", "What models are judged against: the reference answers (AlpacaEval 2.0's official protocol, "
        "one judgment per pair in a seeded random order; Arena-Hard's baseline file, both orders), or the first "
        "--model's answers (the paper's Table 3 against the SFT model, both orders).")
    judge: EndpointConfig = knob(factory=EndpointConfig)
    report_to: list[Tracker] = knob(
        factory=list, help="Trackers the suite's results are logged to (one run per suite, grouped by --out).")
    tracker_project: str = knob("allo", "The wandb / Trackio project.")

    # the names the run's eval tables (allo.eval.suite) read from a recipe's task section
    @property
    def eval_limit(self) -> Optional[int]:
        return self.limit

    @property
    def eval_max_new_tokens(self) -> int:
        return self.max_new_tokens


def load_suite(path: str, overrides: Sequence[str] = ()) -> Suite:
    suite = load_config(Suite, path, overrides, "suite keys (benchmarks:, template:, judge:, ...)")
    if not (suite.benchmarks or suite.alpaca_eval or suite.arena_hard):
        raise ConfigError(f"{path}: nothing to evaluate: set benchmarks, alpaca_eval or arena_hard")
    if suite.arena_hard and suite.baseline == "reference" and not suite.arena_baseline:
        raise ConfigError(f"{path}: arena_hard with baseline: reference needs arena_baseline (the reference "
                          "answers, e.g. model_answer/gpt-4-0314.jsonl), or set baseline: first")
    for key in ("alpaca_eval", "arena_hard", "arena_baseline"):
        value = getattr(suite, key)
        if value and not Path(value).exists():
            raise ConfigError(f"{path}: {key}: {value}: no such file (where it comes from: {WHERE})")
    for spec in suite.benchmarks:
        name, _, data = str(spec).partition("=")
        try:
            check_available(name, data or None)
        except BenchmarkError as e:
            raise ConfigError(f"{path}: benchmarks: {e}") from None
    return suite


def parse_models(specs: Sequence[str]) -> dict[str, str]:
    """[LABEL=]PATH -> {label: path}; the label defaults to the directory's name (its parent's for .../model, the
    layout `allo run` writes: runs/qa/improve/model is "improve")."""
    models: dict[str, str] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            p = Path(spec.rstrip("/"))
            label, path = (p.parent.name if p.name == "model" else p.name), spec
        if not label or not path:
            raise ValueError(f"--model {spec!r}: expected PATH or LABEL=PATH")
        if label in models:
            raise ValueError(f"--model {spec!r}: label {label!r} is given twice; name them with LABEL=PATH")
        models[label] = path
    return models


def shard_of(models: dict[str, str], shard: str) -> dict[str, str]:
    """The models this process generates for: every N-th from the I-th (`I/N`), or Slurm's task id and count
    (`slurm`: SLURM_PROCID / SLURM_NTASKS), so each task of a job takes its own models."""
    if shard == "slurm":
        shard = f"{os.environ.get('SLURM_PROCID', 0)}/{os.environ.get('SLURM_NTASKS', 1)}"
    i, _, n = shard.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        raise ValueError(f"--shard {shard!r}: expected I/N with 0 <= I < N, or slurm")
    return dict(list(models.items())[int(i)::int(n)])


def generate(suite: Suite, models: dict[str, str], out: Path) -> None:
    """Per model, one model load: the benchmarks' predictions and results, and the instruction prompts' answers
    (OUT/eval/<label>/<set>.answers.jsonl); whatever is already written is kept."""
    from allo.eval.run import EVAL_SAMPLING, evaluate, predict_resumable
    from allo.generate import Sampling, load_generator, release

    for label, path in models.items():
        loaded = load_generator(path, suite.generation)
        d = out / "eval" / slug(label)
        for spec in suite.benchmarks:
            bench, _, data = spec.partition("=")
            evaluate(path, bench, str(d), data or None, suite.limit,
                     replace(EVAL_SAMPLING, max_new_tokens=suite.max_new_tokens), suite.template, suite.generation,
                     loaded)
        for name, prompts in instruction_suites(suite).items():
            items = [{"id": str(i), "prompt": p, "answer": ""} for i, p in enumerate(prompts)]
            predict_resumable(path, items, d / f"{name}.answers.jsonl", Sampling(max_new_tokens=suite.max_new_tokens),
                              suite.template, suite.generation, loaded, f"{label} {name}")
        del loaded
        release()


def judge(suite: Suite, models: dict[str, str], out: Path) -> Optional[dict]:
    """Table 3 from the answers `generate` wrote: every model against the reference answers (or the first model),
    merged into OUT/eval/results.json; None when the suite has no instruction-following set."""
    import json

    from allo.eval import instruct
    from allo.eval.suite import table3
    from allo.io import read_jsonl, write_json

    sets = instruction_suites(suite)
    if not sets:
        return None
    answers: dict[str, dict[str, list[str]]] = {}
    for name, prompts in sets.items():
        for label in models:
            path = out / "eval" / slug(label) / f"{name}.answers.jsonl"
            rows = {r["id"]: r["output"].strip() for r in read_jsonl(path)} if path.exists() else {}
            if len(rows) < len(prompts):
                raise RuntimeError(f"{path}: {len(rows)} of {len(prompts)} answers; run `allo eval suite` with "
                                   f"--only generate for model {label!r} first")
            answers.setdefault(name, {})[label] = [rows[str(i)] for i in range(len(prompts))]
    order = dict(models)
    if suite.baseline == "reference":
        reference = "reference"
        if suite.alpaca_eval:
            rows = instruct.read_alpaca_outputs(suite.alpaca_eval)[:len(sets["alpaca_eval"])]
            answers["alpaca_eval"][reference] = [r["output"] for r in rows]
            reference = rows[0].get("generator", reference) if rows else reference
        if suite.arena_hard:
            by_uid = instruct.read_arena_answers(suite.arena_baseline)
            qs = instruct.read_arena_questions(suite.arena_hard)[:len(sets["arena_hard"])]
            missing = [q["uid"] for q in qs if q["uid"] not in by_uid]
            if missing:
                raise ValueError(f"{suite.arena_baseline}: no answer for {len(missing)} questions, e.g. uid {missing[0]}")
            answers["arena_hard"]["reference"] = [by_uid[q["uid"]] for q in qs]
        for by_model in answers.values():  # one row name for the reference, whichever file it came from
            by_model[reference] = by_model.pop("reference")
        order = {reference: "", **models}
    table = table3(order, suite, out / "eval", answers, protocol="official" if suite.baseline == "reference" else "swap",
                   judge_key="judge")
    table["_baseline"] = next(iter(order))
    results_file = out / "eval" / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results["table3"] = {**{k: v for k, v in results.get("table3", {}).items() if not k.startswith("_")}, **table}
    write_json(results_file, results)
    return table


def accuracies(out: Path, models: dict[str, str]) -> dict[str, dict[str, float]]:
    """{label: {benchmark: accuracy %}} from the result files the generate phase wrote."""
    from allo.report import accuracies as by_dir

    found = by_dir(out)
    return {label: found[slug(label)] for label in models if slug(label) in found}


def run_suite(suite: Suite, models: dict[str, str], out: Path, only: Optional[str] = None,
              shard: str = "0/1") -> dict:
    """`allo eval suite`: the generate phase for this shard's models, then (unless --only generate) the judge
    phase and the tables for all of them; logged to the suite's trackers."""
    from allo.preflight import model_dir
    from allo.report import tables
    from allo.tracking import check_installed, log_results

    check_installed(suite.report_to, "report_to")
    mine = shard_of(models, shard)
    if only in (None, "generate"):
        for path in mine.values():
            model_dir(path)
        generate(suite, mine, out)
    result: dict = {"suite": suite.name, "out": str(out), "models": models if only != "generate" else mine}
    if only in (None, "judge"):
        result["table2"] = accuracies(out, models)
        table3 = judge(suite, models, out)
        if table3 is not None:
            result["table3"] = table3
        result["tables"] = tables(out)
        log_results(suite.report_to, out / "eval" / f"tracking-{suite.name}", suite.tracker_project, str(out),
                    f"eval-{suite.name}", {k: result[k] for k in ("table2", "table3") if k in result})
    return result
