"""Answer extraction and checking per task family, shared by sampling (labelling) and evaluation.

docs/method.md §6: the answer is the text after the last "The answer is" (case-insensitive). Families:
- `math`: numbers compare numerically (1,024 == 1024.0); anything else (fractions, radicals, intervals, LaTeX)
  goes through math-verify's LaTeX/sympy equivalence. A `\\boxed{...}` after the last "The answer is" (or without
  one) is the answer (how MATH reference solutions and most math-tuned models state it).
- `qa`: the gold option text, case-insensitive, surrounding quotes and punctuation ignored.
- `yesno`: StrategyQA; yes/true and no/false, by the first word of the answer.
"""
from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
from typing import Optional

log = logging.getLogger(__name__)
FAMILIES = ("math", "qa", "yesno")
_ANSWER = re.compile(r"the answer is", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LATEX = re.compile(r"[\\^/{}]")
_PLAIN_NUMBER = re.compile(r"^\$?\s*-?\d[\d,]*(?:\.\d+)?\s*\$?$")


def extract_answer(text: str) -> Optional[str]:
    """Text after the last "The answer is", up to the end of that line and without a final period; None when
    absent."""
    parts = _ANSWER.split(text)
    if len(parts) < 2:
        return None
    tail = parts[-1].strip().lstrip(":").strip()
    tail = tail.split("\n")[0].strip()
    return tail[:-1].strip() if tail.endswith(".") else tail


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def final_answer(text: str, family: str = "math") -> Optional[str]:
    """The stated final answer. For math, whichever comes last: "The answer is ..." or a \\boxed{} (a MATH
    solution may say "the answer is not a multiple of 3" mid-way and box the result at the end)."""
    answer = extract_answer(text)
    if family == "math":
        said = [m.end() for m in _ANSWER.finditer(text)]
        boxed_at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
        if boxed_at >= 0 and (not said or boxed_at > said[-1]):
            answer = last_boxed(text)
    return answer


def to_number(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    m = _NUMBER.search(text)
    return float(m.group().replace(",", "")) if m else None


MATH_CHECK_SECONDS = 5.0  # one LaTeX equivalence check (parse both, verify) at most; then it counts as wrong


class _CheckTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _CheckTimeout in the block after `seconds` (SIGALRM timer: main thread only, where every eval and
    sampling step checks answers; elsewhere the block runs unguarded, which is logged once)."""
    if threading.current_thread() is not threading.main_thread():
        if not getattr(_time_limit, "warned", False):
            log.warning("math answer checks off the main thread run without a time limit")
            _time_limit.warned = True
        yield
        return

    def expire(signum, frame):
        raise _CheckTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def math_equal(answer: str, gold: str) -> bool:
    """A plain-number gold is compared with the first number of a plain-text answer ("18 dollars", "$18"); LaTeX
    answers and non-numeric golds go through math-verify's equivalence of the two LaTeX strings. A \\boxed{}
    inside the answer is what it states. math-verify's own timeouts are off (they would replace our SIGALRM
    handler); the whole check runs under MATH_CHECK_SECONDS instead, so one pathological expression cannot hang
    an evaluation: past it, the answer counts as wrong (logged)."""
    boxed = last_boxed(answer)
    answer = boxed if boxed is not None else answer
    if _PLAIN_NUMBER.match(gold.strip()) and not _LATEX.search(answer):
        a, g = to_number(answer), to_number(gold)
        return a is not None and abs(a - g) < 1e-6 * max(1.0, abs(g))
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that timeouts are off

    def latex(s: str):
        inner = last_boxed(s)
        return parse(f"${(inner if inner is not None else s).strip().strip('$')}$", parsing_timeout=None)

    try:
        with _time_limit(MATH_CHECK_SECONDS):
            g, a = latex(gold), latex(answer)
            return bool(g) and bool(a) and verify(g, a, timeout_seconds=None)
    except _CheckTimeout:
        log.warning("math check of %.60r against %.60r took over %g s: counted as wrong", answer, gold,
                    MATH_CHECK_SECONDS)
        return False
    except Exception:  # sympy can fail on odd input; an unparseable answer is simply not correct
        return False


def _norm_option(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().strip("\"'`*").strip().rstrip(".").strip()).lower()


def yes_no(text: str) -> Optional[str]:
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    return {"yes": "yes", "true": "yes", "no": "no", "false": "no"}.get(words[0])


def is_correct(prediction_text: str, gold: str, family: str = "math") -> bool:
    """Whether a generated solution's final answer matches `gold` for the task family (math, qa, yesno)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r} ({', '.join(FAMILIES)})")
    answer = final_answer(prediction_text, family)
    if answer is None:
        return False
    if family == "math":
        return math_equal(answer, gold)
    if family == "qa":
        return _norm_option(answer) == _norm_option(gold)
    return yes_no(answer) is not None and yes_no(answer) == yes_no(gold)
