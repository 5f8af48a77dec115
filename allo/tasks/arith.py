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


def problem(rng: random.Random, steps: int) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, 30)
    sentences = [f"{name} has {value} {item}."]
    work = []
    for _ in range(steps):
        phrase, op = rng.choice(MORE)
        n = rng.randint(1, 20) if op == "+" else rng.randint(1, max(1, value - 1))
        new = value + n if op == "+" else value - n
        sentences.append(f"{'He' if name in ('Tom', 'Bob', 'Sam', 'Max') else 'She'} {phrase.format(n=n)}.")
        work.append(f"{value} {op} {n} = {new}.")
        value = new
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return {"prompt": question, "response": " " + " ".join(work) + f" The answer is {value}.", "answer": str(value)}


def make_splits(n_train: int, n_test: int, seed: int = 0, max_steps: int = 2) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out problems (1..max_steps operations each)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n_train + n_test:
        p = problem(rng, rng.randint(1, max_steps))
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    return out[:n_train], out[n_train:]
