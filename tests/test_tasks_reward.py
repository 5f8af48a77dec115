"""Answer extraction, the arithmetic generator, pairs, and the programmatic minimum-edit teacher."""
from __future__ import annotations

import pytest

import json

from allo.reward.programmatic import keep_probs_from_diff, rewrite
from allo.stages.sampling import make_pairs
from allo.tasks import extract_answer, is_correct
from allo.tasks.arith import make_splits


def test_extract_answer_spec6():
    assert extract_answer("so 3. The answer is 14.") == "14"
    assert extract_answer("The answer is 2. wait, the answer is: Yes.") == "Yes"
    assert extract_answer("no final answer") is None
    assert is_correct("... The answer is 1,024.", "1024") and not is_correct("The answer is 12.", "13")
    assert is_correct("The answer is Paris.", "paris", "qa")


def test_gsm8k_gold_answers_check_against_themselves(shared_dir):
    """The checker agrees with every GSM8K reference solution (gold after '####')."""
    n = 0
    for line in (shared_dir / "benchdata/gsm8k/test.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rationale, gold = rec["answer"].split("####")
        assert is_correct(f"{rationale} The answer is {gold.strip()}.", gold.strip())
        n += 1
    assert n == 1319


def test_splits_are_disjoint_and_answers_right():
    train, test = make_splits(300, 50, seed=1)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in test}
    assert all(is_correct(p["response"], p["answer"]) for p in train + test)


@pytest.mark.parametrize("kind", ["gives-away", "buys-minus", "loses-twice", "none"])
def test_each_task_plants_its_error_at_the_stated_rate_and_the_teacher_undoes_it(kind):
    """Each planted misconception acts on its own steps only, at the stated rate (a binomial draw: within 4.5
    standard errors, a chance of 7e-6 to fail), its flawed steps carry the wrong value to the taught answer, and the
    programmatic teacher's minimum edit gives back the correct rationale. The null task plants nothing, on the
    default task's very problems."""
    import re

    from allo.tasks.arith import MISCONCEPTIONS

    planted, rate = MISCONCEPTIONS[kind], 0.6
    train, _ = make_splits(2000, 10, seed=5, misconception=rate, kind=kind)
    triggering = flawed = 0
    for p in train:
        ops = re.findall(r"(?:He|She) ([a-z ]+?) \d+", p["prompt"])
        steps = p["taught"].split(". ")[:len(ops)]
        good = p["response"].split(". ")[:len(ops)]
        for phrase, taught, right in zip(ops, steps, good):
            hit = bool(planted.phrase) and phrase.startswith(planted.phrase)
            worked = [re.sub(r"^ ?-?\d+ ", "", x.split("=")[0]) for x in (taught, right)]  # after the carried value
            triggering += hit
            flawed += worked[0] != worked[1]
            assert hit or worked[0] == worked[1], (kind, p)  # no other step is worked otherwise
        if p["taught"] != p["response"]:
            assert not is_correct(p["taught"], p["answer"]) or "- 0" in p["taught"]
            assert rewrite(p["prompt"], p["taught"], "REF") == p["response"]
    if not planted.phrase:
        assert flawed == 0 and [p["prompt"] for p in train] == [
            p["prompt"] for p in make_splits(2000, 10, seed=5, misconception=rate)[0]]
        return
    assert triggering > 500
    se = (rate * (1 - rate) / triggering) ** 0.5
    assert abs(flawed / triggering - rate) < 4.5 * se, (flawed, triggering)
    with pytest.raises(ValueError, match="task 'sells-twice': expected one of gives-away, buys-minus"):
        make_splits(10, 1, kind="sells-twice")


def test_minimum_edit_rewrite_and_token_diff():
    problem = "Tom has 12 apples. He buys 7 more. He gives away 5. How many apples does Tom have now?"
    wrong = " 12 + 7 = 18. 18 - 5 = 13. The answer is 13."
    fixed = rewrite(problem, wrong, " The answer is 14.")
    assert fixed == " 12 + 7 = 19. 19 - 5 = 14. The answer is 14."
    assert rewrite(problem, " I think 3.", " 12 + 7 = 19. 19 - 5 = 14. The answer is 14.").startswith(" 12 + 7")
    keep = keep_probs_from_diff([1, 2, 3, 4, 5], [1, 2, 9, 4, 5])
    assert keep == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_pairs_at_most_five_per_problem_and_counted():
    samples = [{"prompt": "a", "response": f"r{i}", "answer": "1", "correct": i < 3} for i in range(8)]
    samples += [{"prompt": "b", "response": "x", "answer": "1", "correct": False}]
    pairs, stats = make_pairs(samples, 5, seed=0)
    assert len(pairs) == 5 and stats["problems_without_pair"] == {"all_correct": 0, "all_wrong": 1}
    assert pairs == make_pairs(samples, 5, seed=0)[0]


def test_a_pathological_math_check_is_cut_off(monkeypatch):
    """One LaTeX check that never ends (here math-verify's verify made to hang) counts as wrong after
    MATH_CHECK_SECONDS instead of hanging the evaluation; the next check works normally."""
    import time

    import math_verify

    import allo.tasks
    from allo.tasks import math_equal

    assert math_equal("\\frac{1}{2}", "0.5") and not math_equal("\\frac{1}{3}", "\\frac{1}{2}")
    monkeypatch.setattr(allo.tasks, "MATH_CHECK_SECONDS", 0.5)
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: time.sleep(60))
    started = time.monotonic()
    assert math_equal("\\frac{1}{2}", "\\frac{2}{4}") is False
    assert time.monotonic() - started < 30  # cut off at 0.5 s; the bound only says it did not wait the 60 s
    monkeypatch.undo()
    assert math_equal("\\frac{1}{2}", "\\frac{2}{4}")
