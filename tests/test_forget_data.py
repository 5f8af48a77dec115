"""Forget data as the reference code builds it (issue 17): every distinct wrong sample of every problem once, problems
where every sample was wrong included; pairs from distinct predictions."""
from __future__ import annotations

from allo.stages.sampling import make_pairs, unique_wrong, wrong_of_pairs


def _s(prompt: str, response: str, correct: bool, **extra) -> dict:
    return {"prompt": prompt, "response": response, "answer": "7", "correct": correct, **extra}


SAMPLES = [
    # A: one right answer sampled twice, two wrong ones (w1 twice)
    _s("A", "c1", True), _s("A", "c1", True), _s("A", "w1", False), _s("A", "w1", False), _s("A", "w2", False),
    # B: every sample wrong, w3 twice; a reference solution in the problem
    _s("B", "w3", False, reference="ref B"), _s("B", "w3", False, reference="ref B"), _s("B", "w4", False),
    # C: every sample right
    _s("C", "c2", True), _s("C", "c3", True),
    # D: every sample wrong, no reference: the teacher gets the bare gold answer
    _s("D", "w5", False),
]


def test_each_distinct_wrong_response_once_all_wrong_problems_included() -> None:
    rows, stats = unique_wrong(SAMPLES)
    assert sorted((r["prompt"], r["rejected"]) for r in rows) == [("A", "w1"), ("A", "w2"), ("B", "w3"), ("B", "w4"),
                                                                   ("D", "w5")]
    assert stats == {"wrong_samples": 7, "unique_wrong": 5, "unique_wrong_all_wrong_problems": 3,
                     "all_wrong_problems": 2}
    ref = {r["prompt"]: r["reference"] for r in rows}
    assert ref == {"A": "c1", "B": "ref B", "D": " The answer is 7."}


def test_pairs_come_from_distinct_predictions() -> None:
    pairs, stats = make_pairs(SAMPLES, max_per_problem=5)
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("c1", "w1"), ("c1", "w2")]  # not 2 × 2 + 2
    assert stats["pairs"] == 2 and stats["problems_without_pair"] == {"all_correct": 1, "all_wrong": 2}


def test_given_pairs_give_each_rejected_once_with_its_chosen_as_reference() -> None:
    pairs = [{"prompt": "p", "chosen": "good", "rejected": "bad"}, {"prompt": "p", "chosen": "better", "rejected": "bad"},
             {"prompt": [{"role": "user", "content": "q"}], "chosen": "yes", "rejected": "no"}]
    rows = wrong_of_pairs(pairs)
    assert [(r["rejected"], r["reference"]) for r in rows] == [("bad", "good"), ("no", "yes")]
