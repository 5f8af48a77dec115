"""`allo eval SUBCOMMAND`: the benchmark suite from the command line (thin: argv -> library call -> JSON out).

SUBCOMMANDS (`allo eval SUBCOMMAND --help` for each):
  bench         generate with a model and score QA / math benchmarks (resumable)
  score         re-score saved generations without a model
  answer        a model's answers to AlpacaEval instructions or Arena-Hard questions, in their file formats
  alpaca        judge model outputs against a baseline (AlpacaEval 2.0 official, or the paper's swap protocol)
  alpaca-score  win rate and length-controlled win rate of an annotations file, as JSON
  arena         judge Arena-Hard answers against a baseline; Bradley–Terry scores with bootstrap 95% intervals
  suite         an eval suite file (eval/qa.yaml, eval/math.yaml, eval/instruct.yaml) on one or more models
(`allo eval RECIPE` without a subcommand is the pipeline's eval step.)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

SUBCOMMANDS = ("bench", "score", "answer", "alpaca", "alpaca-score", "arena", "suite")
OVERVIEW = __doc__.split("\n\n", 1)[1]  # the subcommand list, also shown by `allo eval --help`


def _judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge endpoint (any OpenAI-compatible server)")
    g.add_argument("--judge-url", required=True, help="base URL, e.g. https://api.openai.com/v1 or http://host:8000/v1")
    g.add_argument("--judge-model", required=True, help="judge model name at that endpoint")
    g.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (never logged); 'none' for a keyless server")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    g.add_argument("--cache", help="judge cache directory (default: OUT_DIR/judge_cache); reruns never pay twice")
    g.add_argument("--price-in", type=float, default=0.0, help="USD per million prompt tokens (cost line in the log)")
    g.add_argument("--price-out", type=float, default=0.0, help="USD per million completion tokens")


def _client(args, out_dir: Path):
    from allo.openai_client import ChatClient, Endpoint

    key_env = None if args.judge_key_env.lower() == "none" else args.judge_key_env
    ep = Endpoint(base_url=args.judge_url, model=args.judge_model, api_key_env=key_env,
                  concurrency=args.concurrency, price_in=args.price_in, price_out=args.price_out)
    return ChatClient(ep, cache_dir=args.cache or str(out_dir / "judge_cache"))


def _add(sub, name: str, text: str, **kw) -> argparse.ArgumentParser:
    """A subcommand whose one-line help is also the start of its --help description."""
    return sub.add_parser(name, help=text, description=kw.pop("description", text[0].upper() + text[1:] + "."), **kw)


def _parser() -> argparse.ArgumentParser:
    from allo.eval.benchmarks import BENCHMARKS

    p = argparse.ArgumentParser(prog="allo eval", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = _add(sub, "bench", "generate and score QA / math benchmarks")
    b.add_argument("--model", required=True, help="Hugging Face checkpoint (directory or hub id)")
    b.add_argument("--benchmark", nargs="+", required=True, metavar="NAME[=FILE]",
                   help=f"benchmarks ({', '.join(BENCHMARKS)}), each optionally =local file or =hub name")
    b.add_argument("--out", required=True, help="output directory (predictions JSONL + result JSON per benchmark)")
    b.add_argument("--limit", type=int, help="first N problems only")
    b.add_argument("--template", default="alpaca_cot", choices=["alpaca_cot", "alpaca", "chat", "raw"],
                   help="prompt template (default alpaca_cot, the paper's QA/math prompt)")
    b.add_argument("--max-new-tokens", type=int, default=512, help="generation length limit (default 512)")
    b.add_argument("--batch-size", type=int, default=32, help="prompts generated together (default 32)")
    s = _add(sub, "score", "score saved generations (no model)")
    s.add_argument("--task", required=True, choices=list(BENCHMARKS), help="benchmark, for its answer checker")
    s.add_argument("--predictions", required=True,
                   help="JSONL, one record per problem: the generated text in `output` (or `generated`, "
                        "`prediction`, `response`) and the gold `answer`, unless --data supplies it")
    s.add_argument("--data", help="benchmark file whose gold answers go with the predictions, in order")
    a = _add(sub, "answer", "a model's answers to AlpacaEval instructions or Arena-Hard questions")
    a.add_argument("--model", required=True, help="Hugging Face checkpoint (directory or hub id)")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--alpaca", metavar="FILE", help="an alpaca_eval outputs file whose instructions to answer")
    src.add_argument("--arena", metavar="FILE", help="an Arena-Hard question.jsonl")
    a.add_argument("--out", required=True, help="model_outputs.json (alpaca) or model_answer JSONL (arena)")
    a.add_argument("--name", help="generator / model name written into the file (default: the model path's name)")
    a.add_argument("--template", default="chat", choices=["chat", "alpaca", "raw"],
                   help="prompt template (default chat: the tokenizer's chat template)")
    a.add_argument("--max-new-tokens", type=int, default=2048, help="generation length limit (default 2048)")
    a.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    a.add_argument("--limit", type=int, help="first N instructions or questions only")
    j = _add(sub, "alpaca", "judge outputs against a baseline; writes alpaca_eval-format annotations")
    j.add_argument("--model-outputs", required=True, help="alpaca_eval-format outputs of the model")
    j.add_argument("--baseline", required=True, help="baseline outputs (AlpacaEval 2.0: gpt4_1106_preview; paper: SFT)")
    j.add_argument("--protocol", default="official", choices=["official", "swap"],
                   help="official: one judgment, order randomised; swap: both orders averaged (paper, vs SFT)")
    j.add_argument("--out", required=True, help="output directory (annotations.json, result.json)")
    j.add_argument("--limit", type=int, help="first N instructions only")
    j.add_argument("--seed", type=int, default=0, help="seed of which side the judge sees first (default 0)")
    _judge_args(j)
    sc = _add(sub, "alpaca-score", "win rate + length-controlled win rate of an annotations file")
    sc.add_argument("annotations", help="JSON array {instruction, output_1, output_2, generator_1, generator_2, "
                                        "preference} (alpaca_eval's format)")
    sc.add_argument("--difficulty", help="a local copy of alpaca_eval's df_gamed.csv or instruction_difficulty.csv "
                                         "(tatsu-lab/alpaca_eval on the hub) for the length-controlled win rate "
                                         "without the hub (default: $ALLO_ALPACA_DIFFICULTY)")
    ar = _add(sub, "arena", "Arena-Hard judging and Bradley–Terry scores")
    ar.add_argument("--questions", required=True, help="question.jsonl (v0.1 or v2.0)")
    ar.add_argument("--baseline", required=True, help="baseline model_answer JSONL (v0.1: gpt-4-0314; paper: SFT)")
    ar.add_argument("--answers", required=True, help="the model's model_answer JSONL")
    ar.add_argument("--out", required=True, help="output directory (judgments.jsonl, result.json)")
    ar.add_argument("--judge-prompt", choices=["official", "allo"], default="official",
                    help="official (default): the leaderboard's judge prompts and verdict parsing of the question "
                         "file's version (arena-hard-auto v0.1 / v2.0, by category); allo: allo's wording, a verdict "
                         "only when the judgment names one distinct label")
    ar.add_argument("--system-prompt", help="a judge system prompt file (overrides --judge-prompt)")
    ar.add_argument("--bootstrap", type=int, default=100, help="bootstrap rounds for the 95%% interval")
    ar.add_argument("--limit", type=int, help="first N questions only")
    _judge_args(ar)
    su = _add(sub, "suite", "an eval suite file on one or more models; tables where `allo report` reads")
    su.add_argument("suite_file", help="a suite YAML (eval/qa.yaml, eval/math.yaml, eval/instruct.yaml)")
    su.add_argument("--model", dest="models", action="append", required=True, metavar="[LABEL=]PATH",
                    help="a model to evaluate (repeatable); LABEL names its row (default: the directory's name, its "
                         "parent's for .../model); with the suite's baseline: first, the first is the baseline")
    su.add_argument("--out", help="output directory (default: runs/eval/SUITE_NAME); results in OUT/eval/")
    su.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a suite value, e.g. --set limit=50 (repeatable)")
    su.add_argument("--only", choices=["generate", "judge"],
                    help="generate: predictions and answers only (e.g. one Slurm task per GPU); judge: Table 3's "
                         "judging and the tables from what was generated")
    su.add_argument("--shard", default="0/1", metavar="I/N|slurm",
                    help="generate for every N-th model from the I-th; slurm: SLURM_PROCID/SLURM_NTASKS")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if isinstance(getattr(args, "model", None), str):
            from allo.preflight import model_dir

            model_dir(args.model)
        result = globals()["_" + args.cmd.replace("-", "_")](args)
    except (ValueError, OSError, RuntimeError) as e:  # ConfigError and the preflight's InputError included
        print(f"allo eval {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def _bench(args) -> dict:
    from dataclasses import replace

    from allo.config import GenerationConfig
    from allo.eval.run import EVAL_SAMPLING, evaluate

    from allo.eval.benchmarks import check_available

    for spec in args.benchmark:  # every benchmark can be had before the model loads and generates
        name, _, data = spec.partition("=")
        check_available(name, data or None)
    gen = replace(EVAL_SAMPLING, max_new_tokens=args.max_new_tokens)
    loaded = _load(args.model)
    out = {}
    for spec in args.benchmark:
        name, _, data = spec.partition("=")
        r = evaluate(args.model, name, args.out, data or None, args.limit, gen, args.template,
                     GenerationConfig(batch_size=args.batch_size), loaded)
        out[name] = {"accuracy": r["accuracy"], "n": r["n"]}
    return out


def _load(model: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from allo.generate import device_and_dtype, vllm_available

    if vllm_available():
        return None
    device, dtype = device_and_dtype()
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device), AutoTokenizer.from_pretrained(model)


def _score(args) -> dict:
    from allo.eval import benchmarks
    from allo.io import read_jsonl
    from allo.eval.run import score

    rows = read_jsonl(args.predictions)
    gold = [it["answer"] for it in benchmarks.load(args.task, args.data)[0]] if args.data else None
    if gold is not None and len(gold) != len(rows):
        raise ValueError(f"{args.predictions} has {len(rows)} records, {args.data} has {len(gold)} problems")
    records = []
    for n, row in enumerate(rows, 1):
        text = next((row[k] for k in ("output", "generated", "prediction", "response") if isinstance(row.get(k), str)),
                    None)
        if text is None:
            raise ValueError(f"{args.predictions}:{n}: no generated text (output, generated, prediction, response)")
        answer = gold[n - 1] if gold is not None else row.get("answer")
        if answer is None:
            raise ValueError(f"{args.predictions}:{n}: field answer: missing (or pass --data with the benchmark file)")
        records.append({"output": text, "answer": str(answer)})
    return {"task": args.task, "predictions": args.predictions,
            **score(records, benchmarks.get(args.task).family)}


def _answer(args) -> dict:
    from allo.data.templates import render_prompt
    from allo.config import GenerationConfig
    from allo.eval import instruct
    from allo.generate import Sampling, generate

    name = args.name or Path(args.model.rstrip("/")).name
    loaded = _load(args.model)
    tokenizer = loaded[1] if loaded else __import__("transformers").AutoTokenizer.from_pretrained(args.model)
    rows = instruct.read_alpaca_outputs(args.alpaca) if args.alpaca else instruct.read_arena_questions(args.arena)
    rows = rows[:args.limit] if args.limit else rows
    texts = [r["instruction"] if args.alpaca else r["prompt"] for r in rows]
    prompts = [render_prompt(t, args.template, tokenizer) for t in texts]
    outs = generate(args.model, prompts, Sampling(max_new_tokens=args.max_new_tokens),
                    GenerationConfig(batch_size=args.batch_size), *(loaded or (None, None)))
    answers = [o[0].strip() for o in outs]
    if args.alpaca:
        instruct.write_alpaca_outputs(args.out, rows, answers, name)
    else:
        instruct.write_arena_answers(args.out, rows, answers, name)
    return {"out": args.out, "answers": len(answers), "model": name}


def _alpaca(args) -> dict:
    from allo.eval import instruct, judges
    from allo.eval.provenance import harness
    from allo.io import write_json

    out = Path(args.out)
    model = instruct.read_alpaca_outputs(args.model_outputs)
    base = {r["instruction"]: r for r in instruct.read_alpaca_outputs(args.baseline)}
    model = model[:args.limit] if args.limit else model
    missing = [r["instruction"][:60] for r in model if r["instruction"] not in base]
    if missing:
        raise ValueError(f"{len(missing)} instructions of {args.model_outputs} have no baseline output in "
                         f"{args.baseline}, e.g. {missing[0]!r}")
    client = _client(args, out)
    ann = judges.alpaca_pairs(client, [r["instruction"] for r in model],
                              [base[r["instruction"]]["output"] for r in model], [r["output"] for r in model],
                              base[model[0]["instruction"]].get("generator", "baseline"),
                              model[0].get("generator", "model"), args.protocol, args.seed)
    write_json(out / "annotations.json", ann)
    metrics, note = judges.alpaca_score(ann)
    if note:
        print(note, file=sys.stderr)
    result = {"protocol": args.protocol, "model_outputs": args.model_outputs, "baseline": args.baseline,
              "judge": {"url": args.judge_url, "model": args.judge_model,
                        "template": f"alpaca_eval {judges.ALPACA_ANNOTATOR}"},
              "usage": client.usage.summary(client.ep), **metrics, **harness()}
    write_json(out / "result.json", result)
    return result


def _alpaca_score(args) -> dict:
    from allo.eval import judges
    from allo.io import read_json

    data = read_json(args.annotations)
    if not isinstance(data, list) or not all(isinstance(a, dict) and "preference" in a for a in data):
        raise ValueError(f"{args.annotations}: expected a JSON array of annotations with a `preference` field")
    metrics, note = judges.alpaca_score(data, args.difficulty)
    if note:
        print(note, file=sys.stderr)
    return metrics


def _arena(args) -> dict:
    from allo.eval import bradley_terry, instruct, judges
    from allo.eval.provenance import harness
    from allo.io import write_json, write_jsonl

    out = Path(args.out)
    questions = instruct.read_arena_questions(args.questions)
    questions = questions[:args.limit] if args.limit else questions
    base_name, model_name = instruct.model_name(args.baseline), instruct.model_name(args.answers)
    if base_name == model_name:
        model_name += " (model)"
    version = instruct.arena_version(questions)
    official = args.judge_prompt == "official" and not args.system_prompt
    system = (Path(args.system_prompt).read_text() if args.system_prompt else
              judges.official_system_prompt if official else judges.ARENA_SYSTEM)
    setup = judges.ARENA_VERSIONS.get(version, judges.ARENA_VERSIONS["v0.1"])
    client = _client(args, out)
    games = judges.arena_games(client, questions, instruct.read_arena_answers(args.baseline),
                               instruct.read_arena_answers(args.answers), system, max_tokens=setup["max_tokens"],
                               verdict=judges.official_verdict if official else judges.parse_verdict)
    write_jsonl(out / "judgments.jsonl", games)
    battles, groups, missing = judges.battles(games, model_name, base_name)
    if not battles:
        raise RuntimeError("the judge gave no usable verdict in any game")
    scores = bradley_terry.scores(battles, base_name, args.bootstrap, groups=groups)
    official_baselines = {setup["baseline"].get(q.get("category"), "?") for q in questions}
    comparable = (official and version in judges.ARENA_VERSIONS and official_baselines == {base_name}
                  and args.judge_model == setup["judge"])  # every question against its own official baseline
    result = {"arena_hard_version": version, "questions": len(questions),
              "leaderboard_comparable": comparable,
              "leaderboard_setup": {"judge": setup["judge"], "baseline": sorted(official_baselines)},
              "games": len(games), "games_without_verdict": missing, "model": model_name, "baseline": base_name,
              "score": scores[model_name]["score"], "ci95": scores[model_name]["ci95"],
              "system_prompt": args.system_prompt or (f"arena-hard-auto official ({version})" if official else
                                                      "allo's wording (not the leaderboard's)"),
              "judge": {"url": args.judge_url, "model": args.judge_model},
              "usage": client.usage.summary(client.ep), **harness()}
    write_json(out / "result.json", result)
    return result


def _suite(args) -> dict:
    from allo.eval.suites import load_suite, parse_models, run_suite

    suite = load_suite(args.suite_file, args.overrides)
    out = Path(args.out or Path("runs") / "eval" / suite.name)
    result = run_suite(suite, parse_models(args.models), out, args.only, args.shard)
    if result.get("tables"):
        print(result["tables"], file=sys.stderr)  # the readable tables; stdout stays JSON
    return result
