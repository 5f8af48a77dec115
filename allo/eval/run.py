"""Generate and score one model on one benchmark: greedy by default, outputs saved as they are produced so a
killed run resumes where it stopped, every result file self-describing (model, data and its hash, settings,
harness version, date)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from allo.config import GenerationConfig
from allo.eval import benchmarks
from allo.eval.provenance import harness
from allo.generate import Sampling
from allo.io import drop_torn_tail, read_jsonl, write_json, write_jsonl
from allo.tasks import final_answer, is_correct

log = logging.getLogger(__name__)


# docs/method.md §6: greedy, 512 new tokens, cut at the next "### Instruction" of the Alpaca template
EVAL_SAMPLING = Sampling(max_new_tokens=512, stop=("### Instruction",))


def score(records: Sequence[dict], family: str) -> dict:
    """Accuracy of records {output, answer} under the family's checker; marks each record in place."""
    correct = unparsed = 0
    for r in records:
        r["extracted"] = final_answer(r["output"], family)
        r["correct"] = is_correct(r["output"], str(r["answer"]), family)
        correct += r["correct"]
        unparsed += r["extracted"] is None
    n = len(records)
    return {"accuracy": round(100 * correct / n, 2) if n else None, "correct": correct, "n": n,
            "no_answer": unparsed}


def _read_done(path: Path) -> dict[str, dict]:
    """Predictions already written, by problem id."""
    return {rec["id"]: rec for rec in read_jsonl(path)} if path.exists() else {}


def evaluate(model: str, benchmark: str, out_dir: str, data: Optional[str] = None, limit: Optional[int] = None,
             sampling: Sampling = EVAL_SAMPLING, template: str = "alpaca_cot",
             engine: Optional[GenerationConfig] = None, loaded: Any = None) -> dict:
    """Write OUT/BENCH.predictions.jsonl (appended batch by batch) and OUT/BENCH.result.json; return the result.
    `sampling`: n is taken as 1; `engine`: how to generate; `loaded`: an optional (model, tokenizer) pair to reuse
    across benchmarks."""
    from allo.generate import vllm_available

    engine = engine or GenerationConfig()
    sampling = replace(sampling, n=1)
    bench = benchmarks.get(benchmark)
    items, source = benchmarks.load(benchmark, data, limit)
    out = Path(out_dir)
    records = predict_resumable(model, items, out / f"{benchmark}.predictions.jsonl", sampling, template, engine,
                                loaded, benchmark)
    metrics = score(records, bench.family)
    result = {"benchmark": benchmark, "family": bench.family, "model": model, "data": source, **metrics,
              "generation": {**asdict(sampling), "stop": list(sampling.stop), "template": template,
                             "batch_size": engine.batch_size, "backend": "vllm" if vllm_available(engine) else "hf"},
              **harness()}
    write_json(out / f"{benchmark}.result.json", result)
    log.info("%s: %s%% (%d / %d)", benchmark, metrics["accuracy"], metrics["correct"], metrics["n"])
    return result


def predict_resumable(model: str, items: Sequence[dict], pred_path: Path, sampling: Sampling, template: str,
                      engine: GenerationConfig, loaded: Any = None, what: str = "") -> list[dict]:
    """Prediction records of `items` ({id, prompt, answer}), in order: those already in `pred_path` are kept, the
    others generated and appended batch by batch (fsync'd), so a killed run resumes where it stopped."""
    from allo.generate import vllm_available

    pred_path.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(pred_path)
    done = _read_done(pred_path)
    todo = [it for it in items if it["id"] not in done]
    if done:
        log.info("%s: %d of %d predictions already in %s; generating the other %d", what, len(items) - len(todo),
                 len(items), pred_path, len(todo))
    if todo:
        if loaded is None or loaded[1] is None:
            from transformers import AutoTokenizer

            loaded = (loaded[0] if loaded else None, AutoTokenizer.from_pretrained(model))
        step = len(todo) if vllm_available(engine) and loaded[0] is None else engine.batch_size * 4
        with open(pred_path, "a") as f:
            for i in range(0, len(todo), step):
                chunk = todo[i:i + step]
                for rec in predict(model, chunk, sampling, template, engine, loaded):
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                log.info("%s: %d / %d generated", what, len(items) - len(todo) + i + len(chunk), len(items))
    by_id = _read_done(pred_path)
    return [by_id[it["id"]] for it in items]


def predict(model: str, items: Sequence[dict], sampling: Sampling, template: str,
            engine: Optional[GenerationConfig], loaded: tuple) -> list[dict]:
    """Prediction records {id, prompt, answer, output} for benchmark items; `loaded` = (HF model or None,
    tokenizer) from `allo.generate.load_generator`."""
    from allo.data.templates import render_prompt
    from allo.generate import generate

    hf_model, tokenizer = loaded
    prompts = [render_prompt(it["prompt"], template, tokenizer) for it in items]
    outs = generate(model, prompts, replace(sampling, n=1), engine, model=hf_model, tokenizer=tokenizer,
                    progress=False)
    return [{"id": it["id"], "prompt": it["prompt"], "answer": it["answer"], "output": o[0]}
            for it, o in zip(items, outs)]


def write_predictions(out_dir: str | Path, benchmark: str, records: Sequence[dict]) -> Path:
    """All of a benchmark's predictions at once (what `evaluate` then scores without generating)."""
    path = Path(out_dir) / f"{benchmark}.predictions.jsonl"
    write_jsonl(path, records)
    return path
