"""The programmatic teacher: minimum-edit rewrites of wrong arithmetic solutions, and the token diff they imply.

For checkable tasks the teacher needs no LLM: it re-does each "a op b = c." step of the wrong solution (or "a op b op
c = d.", a step worked with an operation too many) with the right numbers, keeping every other character, so the
rewrite differs from the wrong response only where the reasoning went wrong (docs/method.md §2). Responses whose
steps do not parse are rewritten as the reference solution.
`keep_probs_from_diff` turns a (wrong, rewrite) pair into per-token keep-probabilities (1 kept, 0 edited),
the target a token reward model learns to predict.
"""
from __future__ import annotations

import difflib
import re
from typing import Optional, Sequence

STEP = re.compile(r"(-?\d+) ([+-]) (-?\d+)(?: [+-] -?\d+)* = (-?\d+)\.")  # "a op b [op c ...] = d."
FINAL = re.compile(r"The answer is (-?\d+)\.?")
OPS = re.compile(r"(?:buys|finds|gets) (\d+) more|(?:gives away|loses|sells) (\d+)")


def _operations(problem: str) -> Optional[tuple[int, list[tuple[str, int]]]]:
    start = re.search(r"has (\d+) ", problem)
    if not start:
        return None
    ops = [("+", int(a)) if a else ("-", int(b)) for a, b in OPS.findall(problem)]
    return int(start.group(1)), ops


TASK = ("the tiny recipe's arithmetic word problems (allo/tasks/arith.py: \"NAME has N ITEMS. He buys/finds/gets N more. "
        "She gives away/loses/sells N. ...\")")


def understands(problem: str) -> bool:
    """Whether `problem` is one of TASK's: a starting amount and at least one operation in its wording."""
    parsed = _operations(problem)
    return parsed is not None and bool(parsed[1])


def rewrite(problem: str, wrong: str, reference: str) -> str:
    """Minimal-edit correction of `wrong`; the reference solution when its steps cannot be repaired in place."""
    parsed = _operations(problem)
    steps = list(STEP.finditer(wrong))
    if parsed is None or len(steps) != len(parsed[1]) or not FINAL.search(wrong):
        return reference
    value, ops = parsed
    pieces, last = [], 0
    for m, (op, n) in zip(steps, ops):
        new = value + n if op == "+" else value - n
        pieces.append(wrong[last:m.start()] + f"{value} {op} {n} = {new}.")
        last, value = m.end(), new
    tail = FINAL.sub(f"The answer is {value}.", wrong[last:], count=1)
    return "".join(pieces) + tail


def keep_probs_from_diff(wrong_ids: Sequence[int], rewrite_ids: Sequence[int]) -> list[float]:
    """1.0 for tokens of the wrong response that the rewrite keeps, 0.0 for tokens it replaces or deletes."""
    keep = [0.0] * len(wrong_ids)
    matcher = difflib.SequenceMatcher(a=list(wrong_ids), b=list(rewrite_ids), autojunk=False)
    for block in matcher.get_matching_blocks():
        for i in range(block.a, block.a + block.size):
            keep[i] = 1.0
    return keep
