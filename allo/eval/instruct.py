"""Instruction-following answer files: read AlpacaEval / Arena-Hard inputs, write a model's answers in the same
formats (alpaca_eval's model_outputs.json; Arena-Hard's model_answer JSONL), so their own tools read ours too."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from allo.io import read_json, read_jsonl, write_json, write_jsonl


def read_alpaca_outputs(path: str) -> list[dict]:
    """alpaca_eval model_outputs.json: a JSON array of {instruction, output, generator, dataset?}."""
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of {{instruction, output, generator}}")
    for i, row in enumerate(data):
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{path}[{i}]: field {key}: missing or not a string")
    return data


def write_alpaca_outputs(path: str, instructions: Sequence[dict], outputs: Sequence[str], generator: str) -> None:
    write_json(Path(path), [{"instruction": r["instruction"], "output": o, "generator": generator,
                             "dataset": r.get("dataset")} for r, o in zip(instructions, outputs)])


def read_arena_questions(path: str) -> list[dict]:
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        if "uid" not in row or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}: record {n}: needs uid and a string prompt")
    return rows


def read_arena_answers(path: str) -> dict[str, str]:
    """uid -> the final assistant answer text (Arena-Hard stores {"answer": ...} dicts as the content)."""
    out = {}
    for n, row in enumerate(read_jsonl(path), 1):
        msgs = [m for m in row.get("messages", []) if m.get("role") == "assistant"]
        if "uid" not in row or not msgs:
            raise ValueError(f"{path}: record {n}: needs uid and an assistant message")
        c = msgs[-1]["content"]
        out[row["uid"]] = c.get("answer", "") if isinstance(c, dict) else str(c)
    return out


def model_name(path: str) -> str:
    """The model's name in answer files (from its first row)."""
    rows = read_jsonl(path)
    return rows[0].get("model", Path(path).stem) if rows else Path(path).stem


def write_arena_answers(path: str, questions: Sequence[dict], answers: Sequence[str], model: str) -> None:
    write_jsonl(Path(path), [{"uid": q["uid"], "ans_id": f"{model}-{q['uid']}", "model": model,
                              "messages": [{"role": "user", "content": q["prompt"]},
                                           {"role": "assistant", "content": {"answer": a}}],
                              "tstamp": time.time()} for q, a in zip(questions, answers)])


def arena_version(questions: Sequence[dict]) -> str:
    """v0.1 or v2.0 from the questions' category field ("arena-hard-v0.1" in v0.1; task names in v2.0)."""
    cats = {q.get("category") for q in questions}
    return "v0.1" if cats == {"arena-hard-v0.1"} else "v2.0" if cats & {"hard_prompt", "creative_writing"} else "unknown"
