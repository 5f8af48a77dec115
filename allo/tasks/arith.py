"""The tiny recipe's task: seeded multi-step arithmetic word problems with chain-of-thought answers.

"Tom has 12 apples. He buys 7 more. He gives away 5. How many apples does Tom have now?" ->
" 12 + 7 = 19. 19 - 5 = 14. The answer is 14." Small enough for a model trained from scratch on two CPU cores
to get right often but not always, and checkable, so sampling yields correct and wrong responses to pair.
Train and held-out splits share no problem (the question text is the identity).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ["Tom", "Ann", "Bob", "Eva", "Sam", "Lia", "Max", "Zoe"]
ITEMS = ["apples", "pens", "cards", "coins", "books", "shells"]
MORE = [("buys {n} more", "+"), ("finds {n} more", "+"), ("gets {n} more", "+"),
        ("gives away {n}", "-"), ("loses {n}", "-"), ("sells {n}", "-")]


@dataclass(frozen=True)
class Misconception:
    """A planted error: the step whose wording triggers it, and how a flawed rationale works that step."""
    name: str
    phrase: str        # the wording of the step it acts on; "" for none (the null task)
    draws_on: str      # the steps on which the rate is drawn (the null task draws where gives-away does, so its
    #                    problems are the default task's)
    about: str

    def work(self, value: int, n: int) -> tuple[str, int]:
        """The flawed working of a triggering step: its text and the value carried on."""
        if self.name == "gives-away":
            return f"{value} + {n} = {value + n}.", value + n
        if self.name == "buys-minus":
            return f"{value} - {n} = {value - n}.", value - n
        if self.name == "loses-twice":
            return f"{value} - {n} - {n} = {value - 2 * n}.", value - 2 * n
        raise ValueError(f"{self.name}: plants no error")


MISCONCEPTIONS = {m.name: m for m in (
    Misconception("gives-away", "gives away", "gives away",
                  "\"gives away N\" worked as an addition (one token: + for -)"),
    Misconception("buys-minus", "buys", "buys", "\"buys N more\" worked as a subtraction (the other operation)"),
    Misconception("loses-twice", "loses", "loses", "\"loses N\" subtracted twice (an extra \" - N\": several tokens)"),
    Misconception("none", "", "gives away", "no planted error (the null task: the default task's problems)"))}
MISCONCEPTION = MISCONCEPTIONS["gives-away"].phrase  # the default task's triggering phrase


def problem(rng: random.Random, steps: int, misconception: float = 0.0, kind: str = "gives-away") -> dict:
    """A problem with its correct rationale (`response`) and the rationale an SFT record gets (`taught`): with
    probability `misconception` per triggering step of `kind` (MISCONCEPTIONS), that step is worked the flawed way
    and the wrong value carried to the final answer (the systematic misconception preference pairs can correct).
    The draws do not depend on `misconception`, so the problems are the same for every value."""
    planted = MISCONCEPTIONS[kind]
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = taught_value = rng.randint(2, 30)
    sentences = [f"{name} has {value} {item}."]
    work, taught = [], []
    for _ in range(steps):
        phrase, op = rng.choice(MORE)
        n = rng.randint(1, 20) if op == "+" else rng.randint(1, max(1, value - 1))
        drawn = phrase.startswith(planted.draws_on) and rng.random() < misconception
        flawed = drawn and bool(planted.phrase)
        new = value + n if op == "+" else value - n
        sentences.append(f"{'He' if name in ('Tom', 'Bob', 'Sam', 'Max') else 'She'} {phrase.format(n=n)}.")
        work.append(f"{value} {op} {n} = {new}.")
        if flawed:
            step, taught_new = planted.work(taught_value, n)
        else:
            taught_new = taught_value + n if op == "+" else taught_value - n
            step = f"{taught_value} {op} {n} = {taught_new}."
        taught.append(step)
        value, taught_value = new, taught_new
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return {"prompt": question, "response": " " + " ".join(work) + f" The answer is {value}.", "answer": str(value),
            "taught": " " + " ".join(taught) + f" The answer is {taught_value}."}


def make_splits(n_train: int, n_test: int, seed: int = 0, max_steps: int = 2, n_dev: int = 0,
                misconception: float = 0.0, kind: str = "gives-away") -> tuple[list[dict], ...]:
    """Disjoint train / held-out problems (1..max_steps operations each); with `n_dev`, also a development split
    from the same distribution (train, dev, test), for tuning without the test set. `misconception` and `kind`: see
    `problem` (they change only the train records' `taught` rationale)."""
    if kind not in MISCONCEPTIONS:
        raise ValueError(f"task {kind!r}: expected one of {', '.join(MISCONCEPTIONS)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n_train + n_dev + n_test:
        p = problem(rng, rng.randint(1, max_steps), misconception, kind)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    train, dev, test = out[:n_train], out[n_train:n_train + n_dev], out[n_train + n_dev:]
    return (train, dev, test) if n_dev else (train, test)
