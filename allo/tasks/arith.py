"""The tiny recipe's task: seeded multi-step arithmetic word problems with chain-of-thought answers.

"Tom has 12 apples. He buys 7 more. He gives away 5. How many apples does Tom have now?" ->
" 12 + 7 = 19. 19 - 5 = 14. The answer is 14." Small enough for a model trained from scratch on two CPU cores
to get right often but not always, and checkable, so sampling yields correct and wrong responses to pair.
Train and held-out splits share no problem (the question text is the identity).
"""
from __future__ import annotations

import random

NAMES = ["Tom", "Ann", "Bob", "Eva", "Sam", "Lia", "Max", "Zoe"]
ITEMS = ["apples", "pens", "cards", "coins", "books", "shells"]
MORE = [("buys {n} more", "+"), ("finds {n} more", "+"), ("gets {n} more", "+"),
        ("gives away {n}", "-"), ("loses {n}", "-"), ("sells {n}", "-")]


MISCONCEPTION = "gives away"  # the phrase a flawed rationale misreads as adding


def problem(rng: random.Random, steps: int, misconception: float = 0.0) -> dict:
    """A problem with its correct rationale (`response`) and the rationale an SFT record gets (`taught`): with
    probability `misconception` per "gives away" step, that step is worked as an addition and the wrong value carried
    to the final answer (the systematic misconception preference pairs can correct). The draws do not depend on
    `misconception`, so the problems are the same for every value."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = taught_value = rng.randint(2, 30)
    sentences = [f"{name} has {value} {item}."]
    work, taught = [], []
    for _ in range(steps):
        phrase, op = rng.choice(MORE)
        n = rng.randint(1, 20) if op == "+" else rng.randint(1, max(1, value - 1))
        flawed = phrase.startswith(MISCONCEPTION) and rng.random() < misconception
        new = value + n if op == "+" else value - n
        sentences.append(f"{'He' if name in ('Tom', 'Bob', 'Sam', 'Max') else 'She'} {phrase.format(n=n)}.")
        work.append(f"{value} {op} {n} = {new}.")
        taught_op = "+" if flawed else op
        taught_new = taught_value + n if taught_op == "+" else taught_value - n
        taught.append(f"{taught_value} {taught_op} {n} = {taught_new}.")
        value, taught_value = new, taught_new
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return {"prompt": question, "response": " " + " ".join(work) + f" The answer is {value}.", "answer": str(value),
            "taught": " " + " ".join(taught) + f" The answer is {taught_value}."}


def make_splits(n_train: int, n_test: int, seed: int = 0, max_steps: int = 2, n_dev: int = 0,
                misconception: float = 0.0) -> tuple[list[dict], ...]:
    """Disjoint train / held-out problems (1..max_steps operations each); with `n_dev`, also a development split
    from the same distribution (train, dev, test), for tuning without the test set. `misconception`: see
    `problem` (it changes only the train records' `taught` rationale)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n_train + n_dev + n_test:
        p = problem(rng, rng.randint(1, max_steps), misconception)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    train, dev, test = out[:n_train], out[n_train:n_train + n_dev], out[n_train + n_dev:]
    return (train, dev, test) if n_dev else (train, test)
