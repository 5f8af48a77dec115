"""`make experiment`: does ALLO beat baselines matched to it in optimizer steps, data and signal on the tiny task,
when every method is tuned the same way and never on the test problems? The task is the demo's
(recipes/tiny/demo.py): arithmetic word problems whose SFT rationales carry a planted misconception ("gives away"
worked as an addition in 60% of those steps), so the SFT model has an error mode that preference data can fix.

Methods, each trained from the seed's SFT model:
- DPO, NPO and SimPO: the demo's baselines, one epoch over the pairs (NPO: over the wrong responses);
- ALLO: warm-up DPO, locate, token reward model, forget (N1), improve (N2);
- DPO-steps: DPO for as many optimizer steps as ALLO's forget and improve together;
- NPO-DPO: NPO (at its own chosen rate), then DPO, every parameter, on ALLO's wrong responses and pairs;
- DPO-rewrites: DPO whose chosen responses are the teacher's rewrites of the wrong ones (the teacher's signal);
- DPO-pairs-rewrites: DPO on the sampled pairs plus the rewrite pairs, for ALLO's forget + improve steps;
- DPO-NLL: DPO with the chosen responses' NLL added (weight 1);
- RFT and RFT-DPO: SFT on the sampled problems' gold references (the information the teacher and reward model
  use), alone and followed by DPO at its own rate (tuned after RFT, as NPO-DPO after NPO);
- ALLO without locate: forget and improve on every parameter (100% masks, `allo ablate --without locate`);
- with --controls, also ALLO with random masks of the same sizes, without the token reward (uniform forget weights)
  and without the noise mask (improve keeps every rejected token).

1. Tune on seed 0 (the tuning seed, never a test seed), development split only; seed 0 has no test file. Every
   method gets the same five grid points, its recipe learning rates × 1/3, 1, 3, 10 and 30 (ALLO and its controls:
   forget's and improve's together, at the recipe's ratio). A method whose best is an edge of the points tried
   gets the next point past it (×1/10, 1/30, 1/100 or ×100, 300, 1000) until its best is inside. NPO-DPO is tuned
   after NPO, with NPO at its chosen rate. Then each method's second knob at its chosen rate, ×1/3 and ×3 of the
   recipe's value besides ×1: β (NPO, SimPO and every DPO-family baseline, each its own), DPO+NLL's NLL weight,
   RFT's epochs (2 and 3 besides 1) and ALLO's forget:improve rate ratio (forget's rate ×1/3 or ×3, improve's
   kept; its controls too): all methods in two runs, the methods tuned after another in two more. Ties are broken by
   `pick`'s stated rule.
2. Test once per seed (default seeds 1..8): every method at its chosen rates and knob; each model is evaluated
   once on the seed's test split. Reported: mean ± standard error over seeds; for every method against DPO and
   against ALLO the pooled difference with a 95% paired bootstrap interval (problems resampled within each seed);
   one primary contrast, ALLO against the baseline best on the development split, and ALLO's other contrasts as
   secondary (Holm-adjusted), from a hierarchical bootstrap (seeds, then problems); accuracy on the problems with a
   step the planted misconception acts on ("gives away") and on the rest; optimizer steps, training examples and
   sequence passes per method.
   Writes runs/tiny/experiment/table.md (with the date, commit and wall time) and result.json.

--task picks the planted misconception (allo/tasks/arith.py: gives-away, the default; buys-minus, the other
operation; loses-twice, an error several tokens long; none, the null task, where ALLO should not beat DPO); a task
other than the default runs in runs/tiny/experiment/TASK.

--grid sqrt3 tunes over factors √3 apart (×1/3 to ×27, twice the points); --dev-problems N sizes the tuning seed's
development split (one problem is 100/N points; the test seeds' problems do not change). An interrupted tuning
resumes from RUN/tuning-scores.json. --replicates N trains each test seed N times, the later ones with only the
numerics changed (ATEN_CPU_CAPABILITY=default), and the intervals draw among them. --upper-bound also tunes every
method on the test split itself (every grid point on every test seed, in directories of their own), reported apart
as an upper bound.

Usage: python recipes/tiny/experiment.py [--seeds 1 2 ...] [--controls] [--quick] [--task T] [--replicates N]
                                         [--grid sqrt3] [--dev-problems N] [--upper-bound] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
import demo  # noqa: E402

from allo.config import load_recipe  # noqa: E402
from allo.eval.stats import Paired, hierarchical_bootstrap, holm, paired_bootstrap  # noqa: E402
from allo.manifests import reuse_steps  # noqa: E402
from allo.steps import lookup  # noqa: E402

OUT = ROOT / "runs" / "tiny" / "experiment"
TUNING_SEED = 0
# A second training replicate of a test seed changes only the numerics: torch's CPU kernels at their portable
# dispatch level instead of the machine's vector units (other summation orders; the same data, seeds and settings)
REPLICATE_ENV = {"ATEN_CPU_CAPABILITY": "default"}
GRID = (1 / 3, 1.0, 3.0, 10.0, 30.0)  # the same points for every method: factors on the recipe's learning rates
BEYOND = (1 / 10, 1 / 30, 1 / 100, 100.0, 300.0, 1000.0)  # tried in turn while a method's best is an edge
# --grid sqrt3: twice as fine, √3 apart from ×1/3 to ×27 (and on past an edge the same way)
GRIDS = {"default": (GRID, BEYOND),
         "sqrt3": (tuple(3 ** (k / 2) for k in range(-2, 7)), tuple(3 ** (k / 2) for k in (-3, -4, -5, 7, 8, 9)))}


@dataclass(frozen=True)
class Knob:
    """A method's second tuned setting, tried at its chosen rate: `keys` at the recipe's value × each factor, or
    with `rate`, those sections' learning rates × each factor (ALLO's forget:improve ratio: forget's rate moves,
    improve's stays)."""
    name: str                                  # its column in the table
    keys: tuple[str, ...]                      # recipe keys, or with `rate` the sections whose rate it scales
    factors: tuple[float, ...] = (1 / 3, 3.0)  # tried besides ×1 (the value its rate was tuned at)
    rate: bool = False
    integer: bool = False                      # a count (epochs): the values are rounded

    def value(self, base: float, k: float) -> str:
        v = base * k
        return str(round(v)) if self.integer else f"{v:.3g}"


def beta(section: str) -> Knob:
    return Knob("β", (f"{section}.beta",))


RATIO = Knob("forget:improve rate ratio", ("forget",), rate=True)


@dataclass(frozen=True)
class Method:
    label: str                       # its row; a pipeline method's eval label
    rates: tuple[str, ...]           # recipe sections whose train.lr the grid scales
    enable: tuple[str, ...] = ()     # sections switched on for it (the matched baselines are off by default)
    variant: str = ""                # a control run as this `allo ablate` variant of ALLO's run (its directory name:
                                     # "without-locate" is `--without locate`, "mask-random" `--mask random`)
    after: Optional[str] = None      # a method whose rates stay at their chosen values while this one is tuned
    control: bool = False            # only with --controls
    steps: tuple[str, ...] = ()      # the pipeline steps that train it (for its optimizer steps and examples)
    knob: Optional[Knob] = None      # its second tuned setting


ALLO_STEPS = ("warmup", "reward-train", "forget", "improve")
METHODS = (
    Method("+DPO", ("dpo",), steps=("dpo",), knob=beta("dpo")),
    Method("+NPO", ("npo",), steps=("npo",), knob=beta("npo")),
    Method("+SimPO", ("simpo",), steps=("simpo",), knob=beta("simpo")),
    Method("+ALLO", ("forget", "improve"), steps=ALLO_STEPS, knob=RATIO),
    Method("+DPO-steps", ("dpo_steps",), enable=("dpo_steps",), steps=("dpo-steps",), knob=beta("dpo_steps")),
    Method("+NPO-DPO", ("npo_dpo",), enable=("npo_dpo",), after="+NPO", steps=("npo", "npo-dpo"),
           knob=beta("npo_dpo")),
    Method("+DPO-rewrites", ("dpo_rewrites",), enable=("dpo_rewrites",), steps=("dpo-rewrites",),
           knob=beta("dpo_rewrites")),
    Method("+DPO-pairs-rewrites", ("dpo_pairs_rewrites",), enable=("dpo_pairs_rewrites",),
           steps=("dpo-pairs-rewrites",), knob=beta("dpo_pairs_rewrites")),
    Method("+DPO-NLL", ("dpo_nll",), enable=("dpo_nll",), steps=("dpo-nll",),
           knob=Knob("NLL weight", ("dpo_nll.nll_weight",))),
    Method("+RFT", ("rft",), enable=("rft",), steps=("rft",),
           knob=Knob("epochs", ("rft.train.epochs",), factors=(2.0, 3.0), integer=True)),
    Method("+RFT-DPO", ("rft_dpo",), enable=("rft_dpo",), after="+RFT", steps=("rft", "rft-dpo"),
           knob=beta("rft_dpo")),
    Method("ALLO without locate", ("forget", "improve"), variant="without-locate", steps=ALLO_STEPS, knob=RATIO),
    Method("ALLO, random masks", ("forget", "improve"), variant="mask-random", control=True, steps=ALLO_STEPS,
           knob=RATIO),
    Method("ALLO without token reward", ("forget", "improve"), variant="without-token-reward", control=True,
           steps=ALLO_STEPS, knob=RATIO),
    Method("ALLO without noise mask", ("forget", "improve"), variant="without-noise-mask", control=True,
           steps=ALLO_STEPS, knob=RATIO),
)


def chosen_methods(controls: bool) -> list[Method]:
    return [m for m in METHODS if controls or not m.control]


def base_rates(user_sets: list[str]) -> dict[str, float]:
    recipe = load_recipe(demo.RECIPE, user_sets)
    return {s: recipe.stage_train(s).lr for m in METHODS for s in m.rates}


def base_knobs(user_sets: list[str]) -> dict[str, float]:
    """The recipe's value of every knob key (a matched baseline's unset β is the dpo section's, which it trains
    with)."""
    recipe = load_recipe(demo.RECIPE, user_sets)
    values = {key: lookup(recipe, key) for m in METHODS if m.knob and not m.knob.rate for key in m.knob.keys}
    return {key: recipe.dpo.beta if v is None else v for key, v in sorted(values.items())}


def rate_sets(rates: dict[str, float]) -> list[str]:
    return [f"{section}.train.lr={lr:.3g}" for section, lr in rates.items()]


def own_rates(m: Method, base: dict[str, float], g: float, k: float = 1.0) -> dict[str, float]:
    """m's sections' rates at base × g, those its rate knob moves × k too."""
    moved = m.knob.keys if m.knob and m.knob.rate else ()
    return {s: base[s] * g * (k if s in moved else 1.0) for s in m.rates}


def scaled(methods: list[Method], base: dict[str, float], factor: dict[str, float],
           knob: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Pipeline rates: each method's sections at base × its factor (× its rate knob's factor; the controls'
    sections are ALLO's)."""
    knob = knob or {}
    return {s: r for m in methods if not m.variant
            for s, r in own_rates(m, base, factor[m.label], knob.get(m.label, 1.0)).items()}


def knob_sets(methods: list[Method], bases: dict[str, float], knob: dict[str, float]) -> list[str]:
    """Every pipeline method's knob keys at the recipe's value × its factor (×1 unless given): set even at ×1, so
    that no baseline's β follows another section's."""
    return [f"{key}={m.knob.value(bases[key], knob.get(m.label, 1.0))}" for m in methods
            if m.knob and not m.knob.rate and not m.variant for key in m.knob.keys]


def prepare(seed: int, size: dict, with_test: bool, user_sets: list[str], methods: list[Method],
            apart: str = "", tag: str = "") -> tuple[Path, list]:
    """Seed's data (train, dev; test only when asked) and tokenizer in seedN{tag}; the run dir and its base `--set`s
    (the matched baselines switched on). With `apart` ("-r1": a training replicate, "-at3": a grid point of the
    upper bound) the outputs go to seedN{apart}, the seed's data and tokenizer staying in seedN (run_all's `data`).
    `tag` keeps a seed whose data differ from its usual ones apart altogether (the tuning seed with --dev-problems:
    seed0-devN)."""
    data = out_dir(size) / f"seed{seed}{tag}"
    template = load_recipe(demo.RECIPE, [*size["sets"], *user_sets]).data.template
    sets = demo.prepare_seed(data, seed, size, template, with_test)
    run = data.with_name(data.name + apart)
    sets = [f"output_dir={run}" if s.startswith("output_dir=") else s for s in sets]
    return run, sets + [f"{s}.enabled=true" for m in methods for s in m.enable] + list(user_sets)


def out_dir(size: dict) -> Path:
    """runs/tiny/experiment, or runs/tiny/experiment/TASK for a task other than the default."""
    task = size.get("task", demo.TASK)
    return OUT if task == demo.TASK else OUT / task


def control_groups(methods: list[Method], factor: dict[str, float],
                   knob: dict[str, float]) -> dict[tuple[float, float], list[Method]]:
    """The controls among `methods` grouped by their (rate factor, knob factor): one `allo ablate` per group."""
    groups: dict[tuple[float, float], list[Method]] = {}
    for m in methods:
        if m.variant:
            groups.setdefault((factor[m.label], knob.get(m.label, 1.0)), []).append(m)
    return groups


def run_all(run: Path, sets: list[str], split: str, rates: dict[str, float], knobs: list[str],
            controls: dict[tuple[float, float], list[Method]], base: dict[str, float], ranks: int,
            env: Optional[dict] = None, data: Optional[Path] = None) -> None:
    """One `allo run` (the pipeline methods at `rates` and `knobs`, evaluated on `split` of `data`'s data, default
    the run's), then one `allo ablate` per distinct control setting (the controls at ALLO's sections × that rate
    factor, forget's × that knob factor)."""
    common = eval_sets(sets, knobs, (data or run) / "data" / split)
    demo.allo("run", common + rate_sets(rates), ranks=ranks, env=env)
    for (g, k), group in controls.items():
        own = {**rates, **own_rates(group[0], base, g, k)}
        demo.allo("ablate", common + rate_sets(own), *ablate_flags(group), ranks=ranks, env=env)


def eval_sets(sets: list[str], knobs: list[str], split: Path) -> list[str]:
    """A run's `--set`s (all but the rates) evaluating on the `split` file."""
    return sets + knobs + [f"task.eval={split}"]


def ablate_flags(group: list[Method]) -> list[str]:
    """`--without A B --mask C`: each flag once, with every value asked for (a repeated flag would replace)."""
    flags: dict[str, list[str]] = {}
    for m in group:
        flag, value = m.variant.split("-", 1)
        flags.setdefault(f"--{flag}", []).append(value)
    return [x for flag, values in flags.items() for x in (flag, *values)]


def source(run: Path, m: Method) -> tuple[Path, str]:
    """Where m's model was trained and evaluated, and its row there: a control is ALLO's row of its variant run."""
    return (run / "ablate" / m.variant, "+ALLO") if m.variant else (run, m.label)


def accuracy(run: Path, m: Method) -> float:
    where, label = source(run, m)
    return json.loads((where / "eval" / "results.json").read_text())["accuracy"][label]


class Tuning:
    """The tuning seed's run on its development split, and each method's development accuracy per grid factor
    (`dev`) and, at its chosen factor, per knob factor (`knob_dev`). `state` and `knob` are the factors of every
    pipeline method in the run as it stands, so that trying one method's point reruns only that method's steps
    (the pipeline skips the rest). Every point's scores are kept in RUN/tuning-scores.json as they come, so that an
    interrupted tuning resumes where it stopped (a file written for other settings is set aside)."""

    def __init__(self, size: dict, user_sets: list[str], methods: list[Method]):
        tag = f"-dev{size['tuning_dev']}" if size.get("tuning_dev") else ""  # its own directory: other data
        size = {**size, "dev": size.get("tuning_dev") or size["dev"]}  # the tuning seed's development split
        self.run, self.sets = prepare(TUNING_SEED, size, with_test=False, user_sets=user_sets, methods=methods,
                                      tag=tag)
        self.dev_sets = self.sets + [f"task.eval={self.run / 'data' / 'dev.jsonl'}"]  # what a single point runs
        self.base, self.methods, self.ranks = base_rates(user_sets), methods, size["ranks"]
        self.knob_base = base_knobs(user_sets)
        self.grid, self.beyond = GRIDS[size.get("grid", "default")]
        self.dev: dict[str, dict[float, float]] = {m.label: {} for m in [Method("SFT", ()), *methods]}
        self.knob_dev: dict[str, dict[float, float]] = {m.label: {} for m in methods if m.knob}
        self.state: dict[str, float] = {}
        self.knob: dict[str, float] = {}
        self.saved = self.run / "tuning-scores.json"
        self.context = {"sets": self.sets, "methods": [m.label for m in methods], "base": self.base,
                        "knobs": self.knob_base,  # and the development split itself (scores of another are stale)
                        "dev": hashlib.sha256((self.run / "data" / "dev.jsonl").read_bytes()).hexdigest()}
        old = json.loads(self.saved.read_text()) if self.saved.exists() else {}
        self.scores: dict[str, dict[str, float]] = old.get("scores", {}) if old.get("context") == self.context else {}
        if self.scores:
            print(f"tuning: {len(self.scores)} points already scored ({self.saved}); resuming", flush=True)

    def _scored(self, key: str, run: Callable[[], dict[str, float]]) -> dict[str, float]:
        """The scores of the point named `key`: kept from an earlier attempt, else run and kept (atomically)."""
        if key not in self.scores:
            self.scores[key] = run()
            tmp = self.saved.with_suffix(".tmp")
            tmp.write_text(json.dumps({"context": self.context, "scores": self.scores}))
            tmp.replace(self.saved)
        return self.scores[key]

    def _run_all(self, controls: dict[tuple[float, float], list[Method]]) -> None:
        """The pipeline methods as the run stands, and `controls`, on the development split."""
        run_all(self.run, self.sets, "dev.jsonl", scaled(self.methods, self.base, self.state, self.knob),
                knob_sets(self.methods, self.knob_base, self.knob), controls, self.base, self.ranks)

    def grid_point(self, g: float, methods: list[Method]) -> None:
        """Every method of `methods` at factor g: one `allo run` and one `allo ablate` for the controls."""
        self.state = {m.label: g for m in self.methods}
        controls = [m for m in methods if m.variant]

        def run() -> dict[str, float]:
            self._run_all({(g, 1.0): controls} if controls else {})
            return {m.label: accuracy(self.run, m) for m in [Method("SFT", ()), *methods]}

        for label, score in self._scored(f"grid ×{g!r} {[m.label for m in methods]}", run).items():
            self.dev[label][g] = score

    def point(self, m: Method, g: float) -> None:
        """One method at factor g, the others as the run stands."""
        if not m.variant:
            self.state[m.label] = g

        def run() -> dict[str, float]:
            if m.variant:
                own = {**scaled(self.methods, self.base, self.state, self.knob), **own_rates(m, self.base, g)}
                demo.allo("ablate", self.dev_sets + knob_sets(self.methods, self.knob_base, self.knob)
                          + rate_sets(own), *ablate_flags([m]), ranks=self.ranks)
            else:
                self._run_all({})
            return {m.label: accuracy(self.run, m)}

        key = f"{m.label} ×{g!r} with {sorted(self.state.items())}"
        self.dev[m.label][g] = self._scored(key, run)[m.label]

    def knob_point(self, turned: dict[str, float], methods: list[Method], best: dict[str, float]) -> None:
        """Every method of `methods` at its chosen factor and its knob at `turned`'s factor, in one run (each
        method's knob moves only its own sections)."""
        self.state = {**self.state, **{m.label: best[m.label] for m in self.methods if not m.variant}}
        self.knob = {**self.knob, **turned}
        controls = control_groups(methods, best, turned)

        def run() -> dict[str, float]:
            self._run_all(controls)
            return {m.label: accuracy(self.run, m) for m in methods}

        key = f"knob {sorted(turned.items())} with {sorted(self.state.items())} {sorted(self.knob.items())}"
        for label, score in self._scored(key, run).items():
            self.knob_dev[label][turned[label]] = score

    def settle(self, m: Method) -> float:
        """m's best factor, after extending its grid past an edge its best sits on (up to three points each way)."""
        for _ in self.beyond:
            g = beyond(self.dev[m.label], self.beyond)
            if g is None:
                break
            print(f"\n=== tuning {m.label}: its best is at the grid's edge, trying ×{g:.3g}", flush=True)
            self.point(m, g)
        return pick(self.dev[m.label])

    def knobs(self, methods: list[Method], best: dict[str, float]) -> dict[str, float]:
        """The knob factor each of `methods` is best at, its rate at `best`. ×1 is the rate tuning's own score,
        except for a method tuned after one whose knob has moved since (RFT-DPO after RFT at 2 epochs): that one's
        ×1 is trained again beside its other points."""
        tries: dict[str, list[float]] = {}
        for m in (m for m in methods if m.knob):
            tries[m.label] = list(m.knob.factors)
            if m.after and self.knob.get(m.after, 1.0) != 1.0:
                tries[m.label].append(1.0)
            else:
                self.knob_dev[m.label][1.0] = self.dev[m.label][best[m.label]]
        for i in range(max(map(len, tries.values()), default=0)):
            at = [m for m in methods if i < len(tries.get(m.label, []))]
            turned = {m.label: tries[m.label][i] for m in at}
            print(f"\n=== tuning the second knob, point {i + 1} (" + ", ".join(
                f"{m.label} {m.knob.name} ×{turned[m.label]:.3g}" for m in at) + ")", flush=True)
            self.knob_point(turned, at, best)
        chosen = {label: pick(self.knob_dev[label]) for label in tries}
        self.knob.update(chosen)
        return chosen


def tune(size: dict, user_sets: list[str], methods: list[Method]) -> dict:
    """Each method's best factor on the tuning seed's development split: the shared grid, then each method's
    extension past an edge, then the methods tuned after another (NPO-DPO with NPO at its chosen rate); then each
    method's second knob at its chosen rate (the methods tuned after another with that one at its chosen knob)."""
    t = Tuning(size, user_sets, methods)
    first = [m for m in methods if not m.after]
    for g in t.grid:
        print(f"\n=== tuning, grid point ×{g:.3g} (seed {TUNING_SEED}, development split)", flush=True)
        t.grid_point(g, first)
    best = {m.label: t.settle(m) for m in first}
    for m in (m for m in methods if m.after):
        t.state[m.after] = best[m.after]
        for g in t.grid:
            print(f"\n=== tuning {m.label} after {m.after} at ×{best[m.after]:.3g}, grid point ×{g:.3g}", flush=True)
            t.point(m, g)
        best[m.label] = t.settle(m)
    knob = t.knobs(first, best)
    knob.update(t.knobs([m for m in methods if m.after], best))
    return {"dev": t.dev, "best_factor": best, "base_rates": t.base, "grid": list(t.grid), "knob_dev": t.knob_dev,
            "best_knob": knob, "base_knobs": t.knob_base}


def pick(scores: dict[float, float]) -> float:
    """The factor with the best development score. Ties, in this order, whatever order the points were tried in:
    the better mean of the point's score and its neighbours' on the sorted points (less noise than one point); the
    point nearest ×1 in log distance; and between two equally near ones (×1/3 and ×3), the larger rate, so that a
    tie never tunes a method into leaving its starting model untouched."""
    tried = sorted(scores)

    def smoothed(i: int) -> Fraction:  # exact: a float mean of equal scores can differ in its last bit with n
        near = [Fraction(scores[tried[j]]) for j in (i - 1, i, i + 1) if 0 <= j < len(tried)]
        return sum(near) / len(near)

    return max(tried, key=lambda g: (scores[g], smoothed(tried.index(g)), -abs(math.log(g)), g))


def beyond(scores: dict[float, float], points: tuple[float, ...] = BEYOND) -> Optional[float]:
    """The next factor of `points` past the edge of the points tried when the best is that edge, else None."""
    best, tried = pick(scores), sorted(scores)
    if best == tried[0]:
        return next((g for g in sorted(points, reverse=True) if g < best), None)
    if best == tried[-1]:
        return next((g for g in sorted(points) if g > best), None)
    return None


def test(size: dict, user_sets: list[str], tuned: dict, seeds: list[int], methods: list[Method]) -> dict:
    """Each seed's test split, once, every method at its chosen rates: per method the per-problem correctness,
    "gives away" flags and its optimizer steps and examples."""
    base, best, knob = tuned["base_rates"], tuned["best_factor"], tuned["best_knob"]
    rates, knobs = scaled(methods, base, best, knob), knob_sets(methods, tuned["base_knobs"], knob)
    controls = control_groups(methods, best, knob)
    out = {}
    task = size.get("task", demo.TASK)
    for seed in seeds:
        run, sets = prepare(seed, size, with_test=True, user_sets=user_sets, methods=methods)
        print(f"\n=== test, seed {seed}", flush=True)
        run_all(run, sets, "test.jsonl", rates, knobs, controls, base, size["ranks"])
        out[seed] = {m.label: outcome(run, m, task) for m in [Method("SFT", ()), *methods]}
        for r in range(1, size.get("replicates", 1)):
            again, sets = prepare(seed, size, with_test=True, user_sets=user_sets, methods=methods, apart=f"-r{r}")
            print(f"\n=== test, seed {seed}, training replicate {r} ({REPLICATE_ENV})", flush=True)
            run_all(again, sets, "test.jsonl", rates, knobs, controls, base, size["ranks"], env=REPLICATE_ENV,
                    data=run)
            for m in [Method("SFT", ()), *methods]:
                out[seed][m.label].setdefault("replicates", []).append(outcome(again, m, task)["correct"])
    return out


def upper_bound(size: dict, user_sets: list[str], tuned: dict, seeds: list[int], methods: list[Method]) -> dict:
    """Every method's rate tuned on the test split itself, for comparison only: each grid point (all methods at ×g
    together, at their development-chosen knobs) trained and scored on every test seed, in a directory of its own
    (seedN-atG), and each method's best point by its accuracy over all test problems. If ALLO at its
    development-chosen rate beats a baseline's best here, tuning noise cannot explain the gap. A point starts from
    copies of the seed's test-run steps it leaves as they are (SFT, samples, warm-up, reward model; a method whose
    chosen rate is ×g): the same outputs `allo run` would make again, by their fingerprints."""
    task = size.get("task", demo.TASK)
    base, knob = tuned["base_rates"], tuned["best_knob"]
    knobs = knob_sets(methods, tuned["base_knobs"], knob)
    scores: dict[str, dict[float, list[int]]] = {}
    for g in tuned.get("grid", GRID):
        factor = {m.label: g for m in methods}
        rates = scaled(methods, base, factor, knob)
        controls = control_groups(methods, factor, knob)
        for seed in seeds:
            run, sets = prepare(seed, size, with_test=True, user_sets=user_sets, methods=methods, apart=f"-at{g:.3g}")
            print(f"\n=== upper bound: grid point ×{g:.3g} on seed {seed}'s test split", flush=True)
            parent = out_dir(size) / f"seed{seed}"  # the seed's test run: its steps this point leaves as they are
            recipe = load_recipe(demo.RECIPE, eval_sets(sets, knobs, parent / "data" / "test.jsonl") + rate_sets(rates))
            copied = reuse_steps(recipe, parent, run)
            if copied:
                print(f"taken from {parent}: {', '.join(copied)}", flush=True)
            run_all(run, sets, "test.jsonl", rates, knobs, controls, base, size["ranks"], data=parent)
            for m in [Method("SFT", ()), *methods]:
                scores.setdefault(m.label, {}).setdefault(g, []).extend(outcome(run, m, task)["correct"])
    best = {label: max(by_g, key=lambda g: (statistics.mean(by_g[g]), -abs(math.log(g)))) for label, by_g in
            scores.items()}
    return {label: {"factor": best[label], "accuracy": 100 * statistics.mean(scores[label][best[label]])}
            for label in scores}


def outcome(run: Path, m: Method, task: str) -> dict:
    """A model's per-problem results on the seed's test split, and what trained it (manifests)."""
    where, label = source(run, m)
    rows = demo.predictions(where, label, task)
    trained = {s: json.loads((where / s / "manifest.json").read_text()) for s in m.steps}
    return {"correct": [int(r["correct"]) for r in rows], "planted": [r["planted"] for r in rows],
            "steps": {s: t.get("steps", 0) for s, t in trained.items()},
            "examples": {s: t.get("examples", 0) for s, t in trained.items()},
            "passes": {s: sum(t.get("passes", {}).values()) for s, t in trained.items()}}


def mean_se(values: list[float]) -> str:
    if len(values) < 2:
        return f"{statistics.mean(values):.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) / math.sqrt(len(values)):.1f}"


def pct(rows: list[dict], kind: bool) -> str:
    right = sum(c for r in rows for c, k in zip(r["correct"], r["planted"]) if k == kind)
    n = sum(k == kind for r in rows for k in r["planted"])
    return f"{100 * right / max(1, n):.1f}"


def counts(rows: list[dict], key: str) -> str:
    """Mean over seeds per training step, joined: "warmup 18 + reward-train 92 + ... = 160"."""
    per = {s: statistics.mean(r[key][s] for r in rows) for s in rows[0][key]}
    if not per:
        return "–"
    parts = " + ".join(f"{s} {v:.0f}" for s, v in per.items())
    return parts if len(per) == 1 else f"{parts} = {sum(per.values()):.0f}"


def table(tuned: dict, results: dict[int, dict], methods: list[Method], wall: float, argv: list[str],
          commit: str, task: str = "gives-away", bound: Optional[dict] = None) -> str:
    seeds = sorted(results)
    labels = ["SFT", *(m.label for m in methods)]
    by = {label: [results[s][label] for s in seeds] for label in labels}
    n = len(by["SFT"][0]["correct"])
    lines = [f"Test accuracy %, greedy, on seeds {', '.join(map(str, seeds))} ({n} problems each); every method at its "
             f"best rate on seed {TUNING_SEED}'s development split. Differences pool every test problem; [95% paired "
             f"bootstrap interval, problems resampled within each seed].", "",
             "| method | accuracy (mean ± SE over seeds) | − DPO | − ALLO | "
             f"\"{demo.planted_phrase(task)}\" problems | other problems | chosen rate; knob |",
             "|---|---|---|---|---|---|---|"]
    for label in labels:
        rows = by[label]
        accs = [100 * statistics.mean(r["correct"]) for r in rows]
        vs = []
        for other in ("+DPO", "+ALLO"):
            vs.append("–" if other == label else str(paired_bootstrap([r["correct"] for r in rows],
                                                                      [r["correct"] for r in by[other]])))
        rate = "–" if label == "SFT" else rate_text(tuned, next(m for m in methods if m.label == label))
        lines.append(f"| {label} | {mean_se(accs)} | {vs[0]} | {vs[1]} | {pct(rows, True)} | {pct(rows, False)} | "
                     f"{rate} |")
    lines += ["", *contrasts(tuned, by, methods)]
    if bound:
        allo = 100 * statistics.mean(c for r in by["+ALLO"] for c in r["correct"])
        lines += ["", "UPPER BOUND, NOT A RESULT: each method at its best grid point on the test split itself (all "
                      f"test problems pooled), against ALLO at its development-chosen rate ({allo:.1f}%):", "",
                  "| method | best factor on test | test accuracy % (upper bound) | ALLO (dev-tuned) − this |",
                  "|---|---|---|---|"]
        lines += [f"| {label} | ×{b['factor']:.3g} | {b['accuracy']:.1f} | {allo - b['accuracy']:+.1f} |"
                  for label, b in bound.items()]
    lines += ["", "What trained each method (per training step, mean over seeds; every method starts from the same SFT "
                  "model): optimizer steps, distinct training examples, and compute as sequences through the model "
                  "(forward and backward passes, reference log-probs included):", "",
              "| method | optimizer steps | training examples | sequence passes |", "|---|---|---|---|"]
    lines += [f"| {m.label} | {counts(by[m.label], 'steps')} | {counts(by[m.label], 'examples')} | "
              f"{counts(by[m.label], 'passes') if 'passes' in by[m.label][0] else '–'} |" for m in methods]
    tried = sorted({g for scores in tuned["dev"].values() for g in scores})
    lines += ["", f"Development accuracy % on seed {TUNING_SEED} at each factor of the recipe's rates (the grid "
                  f"×{', ×'.join(f'{g:.3g}' for g in tuned.get('grid', GRID))} for every method; further points where "
                  "a best was at "
                  f"an edge):", "", "| method | " + " | ".join(f"×{g:.3g}" for g in tried) + " |",
              "|---|" + "---|" * len(tried)]
    for label in labels:
        dev = tuned["dev"][label]
        lines.append(f"| {label} | " + " | ".join(f"{100 * dev[g]:.1f}" if g in dev else "" for g in tried) + " |")
    lines += ["", f"Development accuracy % on seed {TUNING_SEED} at each factor of the method's second knob, at its "
                  "chosen rate (×1 is the rate tuning's own score, retrained for a method tuned after one whose knob "
                  "moved; ALLO's knob scales forget's rate, improve's staying):", "",
              "| method | knob | ×1/3 | ×1 | ×2 | ×3 |", "|---|---|---|---|---|---|"]
    for m in methods:
        if m.knob:
            dev = tuned["knob_dev"][m.label]
            lines.append(f"| {m.label} | {m.knob.name} | " + " | ".join(
                f"{100 * dev[k]:.1f}" if k in dev else "" for k in (1 / 3, 1.0, 2.0, 3.0)) + " |")
    lines += ["", f"{time.strftime('%Y-%m-%d')}, commit {commit}, wall time {wall / 60:.0f} min on "
                  f"{demo.device()} (`python recipes/tiny/experiment.py {' '.join(argv)}`)".replace(" `)", "`)")]
    return "\n".join(lines)


def contrasts(tuned: dict, by: dict[str, list[dict]], methods: list[Method]) -> list[str]:
    """One primary contrast, ALLO against the best baseline (the baseline with the highest development accuracy at
    its chosen rate and knob: chosen without the test split), and the rest of ALLO's contrasts as secondary,
    Holm-adjusted. Intervals and p-values from the hierarchical bootstrap (seeds, then problems within a seed), which
    counts each seed's training as a draw, not a fixed model."""
    baselines = [m.label for m in methods if not m.variant and m.label != "+ALLO"]
    if "+ALLO" not in by or not baselines:
        return []
    dev = {label: chosen_dev(tuned, label) for label in baselines}
    best = max(baselines, key=lambda label: (dev[label], label))
    runs = lambda label: [[r["correct"], *r.get("replicates", [])] for r in by[label]]  # noqa: E731
    test = {label: hierarchical_bootstrap(runs("+ALLO"), runs(label))
            for label in [*baselines, *(m.label for m in methods if m.variant)]}
    others = [label for label in test if label != best]
    adjusted = dict(zip(others, holm([test[label].p for label in others])))
    replicates = 1 + len(by["+ALLO"][0].get("replicates", []))
    lines = [f"Primary contrast, ALLO − {best} (the best baseline on seed {TUNING_SEED}'s development split, "
             f"{100 * dev[best]:.1f}%): {test[best]} (hierarchical bootstrap: seeds, then "
             + (f"one of {replicates} training replicates, then " if replicates > 1 else "") + "problems; "
             + (f"{replicates} training replicates per seed" if replicates > 1 else "one training replicate per seed")
             + ").", "", "Secondary contrasts (Holm-adjusted over these):", "",
             "| ALLO − | difference [95%] | p | Holm p |", "|---|---|---|---|"]
    floor = 2 / 10000  # two-sided p from 10000 resamples: 0 means no resample fell on the other side of 0
    shown = lambda p: f"{p:.2g}" if p else f"< {floor:.0e}"  # noqa: E731
    lines += [f"| {label} | {Paired.__str__(test[label])} | {shown(test[label].p)} | "
              f"{shown(adjusted[label]) if adjusted[label] else f'< {len(others) * floor:.0e}'} |" for label in others]
    if replicates > 1:
        lines += ["", f"Training replicates ({REPLICATE_ENV}): each method's test accuracy % averaged over a seed's "
                      "replicates (mean ± SE over seeds; the table above has the first runs alone), and the spread, "
                      "the mean over seeds of |accuracy of the replicate − the first run|, in points:", "",
                  "| method | accuracy over replicates | spread |", "|---|---|---|"]
        for label in by:
            spread = [abs(statistics.mean(rep) - statistics.mean(r["correct"])) for r in by[label]
                      for rep in r.get("replicates", [])]
            pooled = [100 * statistics.mean(statistics.mean(run) for run in seed) for seed in runs(label)]
            lines.append(f"| {label} | {mean_se(pooled)} | {100 * statistics.mean(spread):.1f} |")
    return lines


def chosen_dev(tuned: dict, label: str) -> float:
    """A method's development accuracy at its chosen rate and knob."""
    if label in tuned["best_knob"]:
        return tuned["knob_dev"][label][tuned["best_knob"][label]]
    return tuned["dev"][label][tuned["best_factor"][label]]


def rate_text(tuned: dict, m: Method) -> str:
    """"×1 (dpo 6e-06); β ×3 (0.3)": the chosen rate factor and rates, then the chosen knob."""
    g, k = tuned["best_factor"][m.label], tuned["best_knob"].get(m.label, 1.0)
    rates = ", ".join(f"{s} {r:.2g}" for s, r in own_rates(m, tuned["base_rates"], g, k).items())
    if not m.knob:
        return f"×{g:.3g} ({rates})"
    values = "" if m.knob.rate else " (" + ", ".join(m.knob.value(tuned["base_knobs"][key], k)
                                                     for key in m.knob.keys) + ")"
    return f"×{g:.3g} ({rates}); {m.knob.name} ×{k:.3g}{values}"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 9)),
                   help=f"test seeds (default 1..8; {TUNING_SEED} is the tuning seed and is refused)")
    p.add_argument("--controls", action="store_true",
                   help="also ALLO with random masks, without the token reward and without the noise mask")
    p.add_argument("--quick", action="store_true", help="the demo's reduced sizes (a check of the script)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--grid", choices=list(GRIDS), default="default", help="the factors every method is tuned over: "
                   "default ×1/3, 1, 3, 10, 30; sqrt3 √3 apart from ×1/3 to ×27")
    p.add_argument("--dev-problems", type=int, help="problems in the tuning seed's development split (default: the "
                   "sizes' 200; one problem is 100/N points)")
    p.add_argument("--upper-bound", action="store_true", help="also tune every method on the test split itself "
                   "(every grid point on every test seed; reported apart, labelled as an upper bound)")
    p.add_argument("--replicates", type=int, default=1, help="training runs per test seed (the second and later "
                   "change only the numerics: ATEN_CPU_CAPABILITY=default); the intervals draw among them")
    p.add_argument("--task", default=demo.TASK, choices=list(demo.MISCONCEPTIONS),
                   help="the planted misconception (none: the null task, where ALLO should not beat DPO); a task "
                        "other than the default writes to runs/tiny/experiment/TASK")
    args = p.parse_args(argv)
    if TUNING_SEED in args.seeds:
        p.error(f"--seeds: seed {TUNING_SEED} is the tuning seed; its test split is never scored")
    size = dict(demo.SIZES["quick" if args.quick else "full"])
    size["ranks"] = demo.ranks(size["ranks"])
    size["task"] = args.task
    size["replicates"] = args.replicates
    size["grid"], size["tuning_dev"] = args.grid, args.dev_problems
    if args.replicates > 1 and demo.device() != "CPU":
        p.error("--replicates: a replicate changes the numerics through torch's CPU dispatch level, which a GPU run "
                "does not use")
    methods = chosen_methods(args.controls)
    t0 = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"  # the code that runs, whatever is committed meanwhile
    tuned = tune(size, args.sets, methods)
    results = test(size, args.sets, tuned, args.seeds, methods)
    bound = upper_bound(size, args.sets, tuned, args.seeds, methods) if args.upper_bound else None
    out = table(tuned, results, methods, time.time() - t0, sys.argv[1:] if argv is None else argv, commit, args.task,
                bound)
    where = out_dir(size)
    where.mkdir(parents=True, exist_ok=True)
    (where / "table.md").write_text(out + "\n")
    (where / "result.json").write_text(json.dumps({"tuning": tuned, "test": results, "task": args.task,
                                                   "upper_bound_tuned_on_test": bound}, default=str))
    print("\n" + out)


if __name__ == "__main__":
    main()
