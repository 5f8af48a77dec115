"""Answer extraction and checking per task family, shared by sampling (labelling) and evaluation.

Spec §6: the answer is the text after the last "The answer is" (case-insensitive); QA compares it with the gold
option text case-insensitively, math compares numbers.
"""
from __future__ import annotations

import re
from typing import Optional

_ANSWER = re.compile(r"the answer is", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> Optional[str]:
    """Text after the last "The answer is", up to the end of that sentence; None when absent."""
    parts = _ANSWER.split(text)
    if len(parts) < 2:
        return None
    tail = parts[-1].strip().lstrip(":").strip()
    tail = tail.split("\n")[0]
    return tail[:-1].strip() if tail.endswith(".") else tail.strip()


def to_number(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    m = _NUMBER.search(text)
    return float(m.group().replace(",", "")) if m else None


def is_correct(prediction_text: str, gold: str, family: str = "math") -> bool:
    """Whether a generated solution's final answer matches `gold` for the task family (math, qa)."""
    answer = extract_answer(prediction_text)
    if answer is None:
        return False
    if family == "math":
        a, g = to_number(answer), to_number(gold)
        return a is not None and g is not None and abs(a - g) < 1e-6 * max(1.0, abs(g))
    if family == "qa":
        return answer.strip().lower() == gold.strip().lower()
    raise ValueError(f"unknown task family {family!r} (math, qa)")
