"""Benchmarks as lists of items {id, prompt, answer, family, solution?}, from a hub name or a local file.

Local files in the formats the public copies use (see `../shared/benchdata/SOURCES.md` in this project):
RLMEC QA JSONL {problem (question + "Options:" lines), solution, answer}; StrategyQA JSON arrays {qid, question,
answer: bool}; GSM8K {question, answer "... #### 42"}; MATH {problem, solution with \\boxed{}, answer?};
SVAMP {Body, Question, Answer}; ASDiv {body, question, answer "9 (apples)"}; MAWPS / GSM-hard {input, target};
TabMWP {question, table?, answer}. Hub datasets whose rows have those fields load through the same normalizers,
as do the multiple-choice hub formats of OpenBookQA and ARC (question(_stem), choices {text, label}, answerKey).
A record a normalizer cannot read stops the load with `file:line: field: problem`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from allo.io import iter_jsonl, read_json
from allo.tasks import last_boxed


class BenchmarkError(ValueError):
    """A benchmark file or record the loader cannot use; the message names the file, line and field."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    family: str                       # checker: math, qa, yesno (allo.tasks)
    normalize: Callable[[dict], dict]  # record -> {prompt, answer, solution?}
    hub: Optional[tuple] = None        # (path, config, split) for datasets.load_dataset
    group: str = "math"                # the paper's table column group: qa or math


def _need(rec: dict, *keys: str):
    for k in keys:
        if k in rec and rec[k] is not None:
            return rec[k]
    raise KeyError(" or ".join(keys))


def _rlmec_qa(rec: dict) -> dict:
    return {"prompt": _need(rec, "problem"), "answer": str(_need(rec, "answer")), "solution": rec.get("solution")}


def _mc_hub(rec: dict) -> dict:
    """OpenBookQA / ARC hub rows: question(_stem), choices {text, label}, answerKey -> RLMEC-style prompt."""
    question = _need(rec, "question_stem", "question")
    choices = _need(rec, "choices")
    texts, labels = list(choices["text"]), list(choices["label"])
    key = str(_need(rec, "answerKey"))
    if key not in labels:
        raise KeyError(f"answerKey {key!r} not among labels {labels}")
    return {"prompt": question + "\nOptions:\n" + "\n".join(texts), "answer": texts[labels.index(key)]}


def _qa(rec: dict) -> dict:
    return _mc_hub(rec) if "choices" in rec else _rlmec_qa(rec)


def _strategyqa(rec: dict) -> dict:
    answer = _need(rec, "answer")
    if not isinstance(answer, bool):
        raise KeyError("answer (expected true/false)")
    return {"prompt": _need(rec, "question"), "answer": "yes" if answer else "no"}


def _gsm8k(rec: dict) -> dict:
    solution = str(_need(rec, "answer"))
    if "####" not in solution:
        raise KeyError("answer (no '#### <number>' line)")
    return {"prompt": _need(rec, "question"), "answer": solution.split("####")[-1].strip().replace(",", ""),
            "solution": solution}


def _math(rec: dict) -> dict:
    solution = str(_need(rec, "solution"))
    answer = rec.get("answer") or last_boxed(solution)
    if answer is None:
        raise KeyError("solution (no \\boxed{} answer) or answer")
    return {"prompt": _need(rec, "problem"), "answer": str(answer), "solution": solution}


def _svamp(rec: dict) -> dict:
    return {"prompt": f"{_need(rec, 'Body').strip()} {_need(rec, 'Question').strip()}",
            "answer": _num(_need(rec, "Answer"))}


def _asdiv(rec: dict) -> dict:
    return {"prompt": f"{_need(rec, 'body').strip()} {_need(rec, 'question').strip()}",
            "answer": str(_need(rec, "answer")).split("(")[0].strip()}


def _input_target(rec: dict) -> dict:
    return {"prompt": _need(rec, "input"), "answer": _num(_need(rec, "target"))}


def _tabmwp(rec: dict) -> dict:
    table = rec.get("table")
    prompt = (f"Read the following table and answer the question.\n{table}\n" if table else "") + _need(rec, "question")
    return {"prompt": prompt, "answer": str(_need(rec, "answer")).replace(",", "")}


def _num(x) -> str:
    """42.0 -> "42"; other values as text."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


BENCHMARKS = {b.name: b for b in [
    Benchmark("ecqa", "qa", _qa, None, "qa"),
    Benchmark("qasc", "qa", _qa, None, "qa"),
    Benchmark("openbookqa", "qa", _qa, ("allenai/openbookqa", "main", "test"), "qa"),
    Benchmark("arc", "qa", _qa, ("allenai/ai2_arc", "ARC-Easy", "test"), "qa"),
    Benchmark("strategyqa", "yesno", _strategyqa, None, "qa"),
    Benchmark("gsm8k", "math", _gsm8k, ("openai/gsm8k", "main", "test")),
    Benchmark("math", "math", _math, ("HuggingFaceH4/MATH-500", None, "test")),
    Benchmark("svamp", "math", _svamp),
    Benchmark("asdiv", "math", _asdiv),
    Benchmark("mawps", "math", _input_target),
    Benchmark("gsm-hard", "math", _input_target),
    Benchmark("tabmwp", "math", _tabmwp),
]}


def get(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    return BENCHMARKS[name]


def _read_local(path: Path) -> list[tuple[str, dict]]:
    """(location, record) pairs from a JSONL file or a JSON array."""
    with open(path, "rb") as f:
        array = f.read(4096).lstrip().startswith(b"[")
    if path.suffix == ".json" or array:
        try:
            data = read_json(path)
        except ValueError as e:
            raise BenchmarkError(str(e)) from None
        if not isinstance(data, list):
            raise BenchmarkError(f"{path}: expected a JSON array of records")
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)]
    try:
        return [(f"{path}:{n}", rec) for n, rec in iter_jsonl(path)]
    except ValueError as e:
        raise BenchmarkError(str(e)) from None


WHERE = "eval/README.md, \"Where the files come from\""


def source_of(name: str, data: Optional[str] = None, split: Optional[str] = None) -> Path | tuple:
    """Where benchmark `name` is read from: a local file (a Path), or a hub (dataset, config, split). A value that
    names a file that is not there is refused here, not sent to the hub as a dataset name."""
    bench = get(name)
    if data and Path(data).exists():
        return Path(data)
    if data and (Path(data).suffix in (".json", ".jsonl", ".parquet") or data.startswith((".", "/"))
                 or data.count("/") > 1):
        raise BenchmarkError(f"{name}={data}: no such file (where each benchmark file comes from: {WHERE})")
    if data and (bench.hub is None or data != bench.hub[0]):
        return data, None, split or "test"
    if bench.hub is None:
        raise BenchmarkError(f"{name}: no hub default; pass a local file, {name}=FILE ({WHERE})")
    return bench.hub[0], bench.hub[1], split or bench.hub[2]


def unreachable(name: str, spec: tuple, why: str) -> BenchmarkError:
    """The one sentence for a hub benchmark that cannot be had here, with the two ways to supply it."""
    return BenchmarkError(
        f"{name}: the hub dataset {spec[0]} cannot be loaded here ({why}); give a local file instead, {name}=FILE "
        f"(`allo eval bench --benchmark {name}=FILE`, `--set 'task.benchmarks=[{name}=FILE, ...]'`, a suite's "
        f"`benchmarks:`, or `prepare_data.py --source {name}=FILE`), or fetch it where there is a network: "
        f"`hf download {spec[0]} --repo-type dataset` ({WHERE})")


def check_available(name: str, data: Optional[str] = None, split: Optional[str] = None) -> None:
    """Before any work: a local file is there and every record of it reads as this benchmark (the error names the
    file, line and field), and a hub dataset is in the local cache when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is
    set (online, the hub is trusted to answer)."""
    from allo.io import hub_dataset_unavailable

    spec = source_of(name, data, split)
    if isinstance(spec, Path):
        load(name, data, split=split)
        return
    why = None if isinstance(spec, Path) else hub_dataset_unavailable(spec[0], spec[1])
    if why is not None:
        raise unreachable(name, spec, "HF_HUB_OFFLINE is set and it is not in the local cache") from why


def load(name: str, data: Optional[str] = None, limit: Optional[int] = None,
         split: Optional[str] = None) -> tuple[list[dict], dict]:
    """Items of benchmark `name` from `data` (a local file or a hub name; None: the benchmark's hub default, with
    its config), and provenance {source, sha256 (local files), n}. `split` picks a hub split (default test)."""
    bench = get(name)
    spec = source_of(name, data, split)
    if isinstance(spec, Path):
        path = spec
        rows = _read_local(path)
        source = {"source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    else:
        from datasets import load_dataset

        try:
            ds = load_dataset(spec[0], spec[1], split=spec[2])
        except Exception as e:  # noqa: BLE001 - offline, unknown, gated: one sentence with the ways out
            raise unreachable(name, spec, str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from e
        rows = [(f"{spec[0]}[{i}]", dict(r)) for i, r in enumerate(ds)]
        source = {"source": f"hub:{spec[0]}" + (f"/{spec[1]}" if spec[1] else "") + f":{spec[2]}",
                  "fingerprint": getattr(ds, "_fingerprint", None)}
    if limit is not None:
        rows = rows[:limit]
    items = []
    for i, (where, rec) in enumerate(rows):
        if not isinstance(rec, dict):
            raise BenchmarkError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        try:
            item = bench.normalize(rec)
        except KeyError as e:
            raise BenchmarkError(f"{where}: field {e.args[0]}: missing or unusable for {name}") from None
        items.append({"id": str(rec.get("unique_id") or rec.get("qid") or rec.get("id") or rec.get("idx", i)),
                      "family": bench.family, **item})
    return items, {**source, "n": len(items)}
