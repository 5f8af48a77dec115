"""`make experiment`'s protocol, with the training runs stubbed (a function of the learning rates stands in for
accuracy): tuning reads only the tuning seed's development split (its test file never exists), every method gets
the same grid, NPO-DPO is tuned with NPO at its chosen rate, each test seed's models are evaluated on its test split
exactly once at the chosen rates, and the table carries paired intervals, step counts and the mechanism split."""
from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes" / "tiny"))
import experiment  # noqa: E402

# Development accuracy as a function of each method's grid factors f and settings kv: DPO peaks at ×100 (past the
# grid) and at β 0.3 (its knob ×3), ALLO likes the smallest rate (past every extension) and forget's rate at 1/3 of
# its share (its knob), without-locate ×1/10, NPO-DPO ×10 but only when NPO sits at its own best (×1), RFT at 3
# epochs (its knob), RFT-DPO at β 0.1 after RFT at 3 epochs; the rest ×1, their knobs flat (a tie, kept at ×1).
DEV = {"+DPO": lambda f, kv: -abs(math.log(f["dpo"] / 100)) + 0.5 * (kv["dpo.beta"] == "0.3"),
       "+ALLO": lambda f, kv: 1 / f["improve"] + 0.5 * (f["forget"] / f["improve"] == pytest.approx(1 / 3)),
       "ALLO without locate": lambda f, kv: -abs(math.log(f["improve"] * 10)),
       "+NPO-DPO": lambda f, kv: -abs(f["npo_dpo"] - 10) - 100 * abs(f["npo"] - 1),
       "+RFT": lambda f, kv: 0.5 * (kv["rft.train.epochs"] == "3"),
       "+RFT-DPO": lambda f, kv: 0.5 * (kv["rft.train.epochs"] == "3" and kv["rft_dpo.beta"] == "0.1")}
TEST_ACC = {"SFT": 3, "+DPO": 5, "+NPO": 4, "+SimPO": 4, "+ALLO": 8, "+DPO-steps": 6, "+NPO-DPO": 5,
            "+DPO-rewrites": 6, "+DPO-pairs-rewrites": 6, "+DPO-NLL": 5, "+RFT": 4, "+RFT-DPO": 6,
            "ALLO without locate": 6}  # right answers of 10 test problems


def fake_experiment(tmp_path: Path, monkeypatch) -> list[dict]:
    """experiment.py with `allo` stubbed: each call recorded; each model's results and manifests written as a run
    would (development accuracy from DEV, test results from TEST_ACC; a numerics replicate's ALLO gets one right
    answer fewer)."""
    monkeypatch.setattr(experiment, "OUT", tmp_path)
    base = experiment.base_rates([])
    labels = [m.label for m in experiment.chosen_methods(False)]
    calls = []

    def write_model(where: Path, label: str, acc: float, correct: int) -> None:
        (where / "eval" / label.strip("+").lower()).mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": "Ann gives away 2" if i % 2 else "Ann buys 2", "correct": i < correct} for i in range(10)]
        (where / "eval" / label.strip("+").lower() / "held-out.predictions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))

    def fake_allo(command, sets, *extra, ranks=2, env=None):
        kv = dict(s.split("=", 1) for s in sets)
        run = Path(kv["output_dir"])
        factor = {s: float(kv[f"{s}.train.lr"]) / base[s] for s in base}
        split = "test" if kv["task.eval"].endswith("test.jsonl") else "dev"
        calls.append({"command": command, "extra": extra, "seed": int(kv["seed"]), "split": split, "factor": factor,
                      "kv": kv,
                      "test_exists": (run / "data" / "test.jsonl").exists(), "sets": list(sets), "env": env,
                      "run": run.name, "eval_exists": Path(kv["task.eval"]).exists()})
        variants = {"locate": "without-locate"} if command == "ablate" else {}
        assert command == "run" or list(extra) == ["--without", "locate"], extra
        rows = {"ALLO without locate": run / "ablate" / "without-locate"} if variants else {
            label: run for label in ["SFT", *labels] if label != "ALLO without locate"}
        for label, where in rows.items():
            row = "+ALLO" if label == "ALLO without locate" else label
            acc = 0.4 + 0.01 * DEV.get(label, lambda f, kv: 0)(factor, kv)
            if split == "test":
                right = TEST_ACC[label] - (label == "+ALLO" and env is not None)
                acc = right / 10
                write_model(where, row, acc, right)
                for step in experiment.ALLO_STEPS + ("dpo", "npo", "simpo", "dpo-steps", "npo-dpo", "dpo-rewrites",
                                                     "dpo-pairs-rewrites", "dpo-nll", "rft", "rft-dpo"):
                    (where / step).mkdir(parents=True, exist_ok=True)
                    (where / step / "manifest.json").write_text(json.dumps(
                        {"steps": 4, "examples": 128, "passes": {"forward": 10, "backward": 8}}))
            (where / "eval").mkdir(parents=True, exist_ok=True)
            results = where / "eval" / "results.json"
            old = json.loads(results.read_text())["accuracy"] if results.exists() and not variants else {}
            results.write_text(json.dumps({"accuracy": {**old, row: acc}}))

    monkeypatch.setattr(experiment.demo, "allo", fake_allo)

    monkeypatch.setattr(experiment.demo, "allo", fake_allo)
    return calls


def test_tuning_never_reads_the_test_split(tmp_path, monkeypatch):
    calls = fake_experiment(tmp_path, monkeypatch)
    experiment.main(["--quick", "--seeds", "1", "2"])
    tuning = [c for c in calls if c["seed"] == experiment.TUNING_SEED]
    testing = [c for c in calls if c["seed"] != experiment.TUNING_SEED]
    assert all(c["split"] == "dev" and not c["test_exists"] for c in tuning)
    assert not any("test.jsonl" in s for c in tuning for s in c["sets"])
    assert {c["split"] for c in testing} == {"test"} and [c["seed"] for c in testing] == [1, 1, 2, 2]
    evaluated = Counter((c["seed"], c["command"]) for c in testing)
    assert evaluated == {(1, "run"): 1, (1, "ablate"): 1, (2, "run"): 1, (2, "ablate"): 1}, "one test eval a model"
    after = [c for c in [c for c in tuning if c["command"] == "run"][len(experiment.GRID):]
             if c["factor"]["npo"] == pytest.approx(1.0)]  # past the shared grid, with NPO at its chosen ×1
    n = len(experiment.GRID)
    assert len(after) == 2 * n + 5  # NPO-DPO's grid after NPO's, RFT-DPO's after RFT's; then the knobs' points
    assert [c["factor"]["npo_dpo"] for c in after[:n]] == pytest.approx(experiment.GRID, rel=1e-3), "NPO-DPO's grid"
    assert [c["factor"]["rft_dpo"] for c in after[n:2 * n]] == pytest.approx(experiment.GRID, rel=1e-3), "RFT-DPO's"
    assert all(c["factor"]["rft"] == pytest.approx(1.0) for c in after[n:2 * n]), "RFT at its best"
    result = json.loads((tmp_path / "result.json").read_text())
    tried = lambda method: sorted(round(float(g), 4) for g in result["tuning"]["dev"][method])  # noqa: E731
    assert tried("+DPO")[-2:] == [100.0, 300.0], "past the grid's top edge until the best is inside"
    assert tried("+ALLO")[:3] == [0.01, 0.0333, 0.1], "three more points at most"
    assert tried("+SimPO") == [round(g, 4) for g in experiment.GRID], "a best inside the grid: no more"
    best = result["tuning"]["best_factor"]
    assert best["+DPO"] == 100.0 and best["+ALLO"] == pytest.approx(0.01)
    assert best["ALLO without locate"] == pytest.approx(0.1) and best["+NPO-DPO"] == 10.0 and best["+NPO"] == 1.0
    run_test, ablate_test = testing[0], testing[1]
    assert run_test["factor"]["dpo"] == pytest.approx(100, rel=1e-3)
    assert run_test["factor"]["forget"] == pytest.approx(0.01 / 3, rel=1e-3)  # and its knob: forget's share ×1/3
    assert run_test["factor"]["improve"] == pytest.approx(0.01, rel=1e-3)
    assert ablate_test["factor"]["forget"] == pytest.approx(0.1, rel=1e-3), "a control at its own chosen rate"
    text = (tmp_path / "table.md").read_text()
    assert "| +ALLO | 80.0 ± 0.0 | +30.0 [" in text, text  # 8 vs 5 right of 10, on both seeds
    assert "| +DPO-steps | dpo-steps 4 | dpo-steps 128 | dpo-steps 18 |" in text
    assert "| warmup 18 + reward-train 18 + forget 18 + improve 18 = 72 |" in text  # ALLO's compute, all of it
    primary = re.search(r"Primary contrast, ALLO − (\S+) \(the best baseline on seed 0's development split, ([\d.]+)%\)",
                        text)
    dev = {m: next(v for g, v in d.items() if float(g) == best[m])  # JSON keys: the factors as text
           for m, d in result["tuning"]["dev"].items() if m.startswith("+") and m != "+ALLO"}
    assert primary and 100 * dev[primary.group(1)] == pytest.approx(max(dev.values()) * 100, abs=0.05), text
    assert "| ALLO − | difference [95%] | p | Holm p |" in text and "| ALLO without locate | +" in text
    assert "| +ALLO | warmup 4 + reward-train 4 + forget 4 + improve 4 = 16 |" in text


def test_the_tuning_seed_is_never_a_test_seed():
    with pytest.raises(SystemExit):
        experiment.main(["--quick", "--seeds", "0", "1"])


def test_ties_follow_a_stated_rule_whatever_the_order_tried():
    """×1/3 and ×3 are equally far from ×1 (|ln 1/3| = |ln 3|): the pick may not depend on which was tried first.
    Smoothed neighbours decide first; between points that stay equal, the larger rate."""
    import itertools

    flat = {1 / 3: 36.5, 1.0: 36.0, 3.0: 36.5, 10.0: 30.0, 0.1: 36.0}
    for order in itertools.permutations(flat):
        assert experiment.pick({g: flat[g] for g in order}) == 1 / 3  # neighbours 36.0, 36.0 beat 36.0, 30.0
    even = {1 / 3: 36.5, 1.0: 36.0, 3.0: 36.5}
    for order in itertools.permutations(even):
        assert experiment.pick({g: even[g] for g in order}) == 3.0  # the same neighbours: the larger rate
    assert experiment.pick({0.1: 30.0, 1.0: 35.0, 10.0: 35.0, 30.0: 35.0}) == 10.0  # smoothing prefers the middle
    assert experiment.pick({1.0: 0.4, 2.0: 0.4, 3.0: 0.4}) == 1.0  # (0.4+0.4+0.4)/3 > 0.4 in floats: a tie all the same


def test_another_task_runs_apart_and_names_its_planted_step(tmp_path, monkeypatch):
    """`--task`: the seeds' data carry that task's misconception (written by demo.prepare_seed), the runs and the
    table go to runs/tiny/experiment/TASK, and the mechanism split is by the task's own phrase (the null task's:
    the default task's steps, where it plants nothing)."""
    import demo

    monkeypatch.setattr(experiment, "OUT", tmp_path)
    assert experiment.out_dir({"task": "gives-away"}) == tmp_path and experiment.out_dir({}) == tmp_path
    assert experiment.out_dir({"task": "loses-twice"}) == tmp_path / "loses-twice"
    assert [demo.planted_phrase(t) for t in ("gives-away", "buys-minus", "loses-twice", "none")] == [
        "gives away", "buys", "loses", "gives away"]
    monkeypatch.setattr(demo, "train_tokenizer", lambda texts, size, out: None)
    size = {"sft": 200, "dev": 10, "test": 10, "rl": 20, "sets": [], "task": "loses-twice"}
    demo.prepare_seed(tmp_path / "run", 3, size, "raw")
    sft = [json.loads(x) for x in (tmp_path / "run" / "data" / "sft.jsonl").read_text().splitlines()]
    twice = [r for r in sft if re.search(r"-?\d+ - (\d+) - \1 = ", r["response"])]  # "loses N" worked twice
    assert twice and all("loses" in r["prompt"] for r in twice)


def test_sequence_passes_count_the_compute_of_a_stage():
    """3 steps of 4 DPO pairs (chosen and rejected: 2 sequences each) forward and backward, and the reference
    log-probs of all 10 pairs once, forward only; NPO (one sequence, its own reference too) and SFT (no reference)."""
    from allo.stages.runner import sequence_passes

    pair, one = {"responses": [[1], [2]]}, {"responses": [[1]]}
    assert sequence_passes(3, 4, [pair] * 10, True) == {"forward": 3 * 4 * 2 + 10 * 2, "backward": 3 * 4 * 2}
    assert sequence_passes(3, 4, [one] * 10, True) == {"forward": 12 + 10, "backward": 12}
    assert sequence_passes(3, 4, [one] * 10, False) == {"forward": 12, "backward": 12}


def test_training_replicates_enter_the_intervals(tmp_path, monkeypatch):
    """--replicates 2: each test seed trains a second time in its own directory with only the numerics changed
    (ATEN_CPU_CAPABILITY=default), the hierarchical interval draws among the replicates, and the table gives the
    accuracy over a seed's replicates and the spread between them (here ALLO's replicate gets one of 10 problems
    fewer: 80% then 70%, 75% over the two, a spread of 10 points)."""
    calls = fake_experiment(tmp_path, monkeypatch)
    experiment.main(["--quick", "--seeds", "1", "2", "--replicates", "2"])
    replicas = [c for c in calls if c["env"]]
    assert {c["run"] for c in replicas} == {"seed1-r1", "seed2-r1"} and all(c["split"] == "test" for c in replicas)
    assert all(c["env"] == {"ATEN_CPU_CAPABILITY": "default"} and c["eval_exists"] for c in replicas)
    text = (tmp_path / "table.md").read_text()
    assert "2 training replicates per seed" in text and "| +ALLO | 75.0 ± 0.0 | 10.0 |" in text
    assert "| +DPO | 50.0 ± 0.0 | 0.0 |" in text  # TEST_ACC: 5 of 10 both times
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["test"]["1"]["+ALLO"]["replicates"] == [[1] * 7 + [0] * 3]


def test_the_test_tuned_upper_bound_is_apart_and_labelled(tmp_path, monkeypatch):
    """--upper-bound: every grid point trained and scored on each test seed in directories of their own (the
    development-tuned test runs untouched), each method's best there reported under an UPPER BOUND label; tuning
    itself still never reads a test split."""
    calls = fake_experiment(tmp_path, monkeypatch)
    experiment.main(["--quick", "--seeds", "1", "--upper-bound"])
    bound = [c for c in calls if c["run"].startswith("seed1-at")]
    assert sorted({c["run"] for c in bound}) == sorted(f"seed1-at{g:.3g}" for g in experiment.GRID)
    assert all(c["split"] == "test" and c["eval_exists"] for c in bound)
    tuning = [c for c in calls if c["seed"] == experiment.TUNING_SEED]
    assert all(c["split"] == "dev" and not c["test_exists"] for c in tuning)
    text = (tmp_path / "table.md").read_text()
    assert "UPPER BOUND, NOT A RESULT" in text and "| +DPO | ×" in text.split("UPPER BOUND")[1]
    assert json.loads((tmp_path / "result.json").read_text())["upper_bound_tuned_on_test"]["+ALLO"]["accuracy"] == 80


def test_an_interrupted_tuning_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Each tuning point's scores are kept as they come: a rerun after a crash at the 7th `allo` call repeats none
    of the six points already scored, and tunes to the same factors as an uninterrupted run."""
    calls = fake_experiment(tmp_path / "whole", monkeypatch)
    experiment.main(["--quick", "--seeds", "1"])
    whole = json.loads((tmp_path / "whole" / "result.json").read_text())["tuning"]["best_factor"]
    tuning_calls = sum(c["seed"] == experiment.TUNING_SEED for c in calls)

    calls = fake_experiment(tmp_path / "cut", monkeypatch)
    stub = experiment.demo.allo

    def crashing(*a, **k):
        if len(calls) == 6:
            raise SystemExit("stage run failed (exit 1)")
        stub(*a, **k)

    monkeypatch.setattr(experiment.demo, "allo", crashing)
    with pytest.raises(SystemExit):
        experiment.main(["--quick", "--seeds", "1"])
    monkeypatch.setattr(experiment.demo, "allo", stub)
    before = len(calls)
    experiment.main(["--quick", "--seeds", "1"])
    again = [c for c in calls[before:] if c["seed"] == experiment.TUNING_SEED]
    assert len(again) == tuning_calls - 6
    assert json.loads((tmp_path / "cut" / "result.json").read_text())["tuning"]["best_factor"] == whole


def test_a_finer_grid_and_a_larger_development_split(tmp_path, monkeypatch):
    """--grid sqrt3 tunes every method over points √3 apart; --dev-problems sizes the tuning seed's development
    split only (the test seeds' problems stay as they were), in a directory of its own, so that neither split's
    runs or scores stand in for the other's."""
    calls = fake_experiment(tmp_path, monkeypatch)
    experiment.main(["--quick", "--seeds", "1"])
    plain = len([c for c in calls if c["seed"] == experiment.TUNING_SEED])
    dev = (tmp_path / "seed0" / "data" / "dev.jsonl").read_text()
    test_split = (tmp_path / "seed1" / "data" / "test.jsonl").read_text()
    calls.clear()
    experiment.main(["--quick", "--seeds", "1", "--grid", "sqrt3", "--dev-problems", "50"])
    tuning = [c for c in calls if c["seed"] == experiment.TUNING_SEED]
    assert {c["run"] for c in tuning} == {"seed0-dev50"} and len(tuning) > plain, "tuned anew, none resumed"
    first = [c for c in tuning if c["command"] == "run"][:9]
    # the rates reach `allo` with 3 significant digits: within 0.5% of the factor
    assert [c["factor"]["dpo"] for c in first] == pytest.approx([3 ** (k / 2) for k in range(-2, 7)], rel=5e-3)
    assert len((tmp_path / "seed0-dev50" / "data" / "dev.jsonl").read_text().splitlines()) == 50
    assert (tmp_path / "seed0" / "data" / "dev.jsonl").read_text() == dev, "the usual tuning seed untouched"
    assert (tmp_path / "seed1" / "data" / "test.jsonl").read_text() == test_split
    assert "×0.577" in (tmp_path / "table.md").read_text()


def test_a_changed_development_split_sets_old_scores_aside(tmp_path, monkeypatch):
    """The tuning resumes only scores of the same development split: were the split's problems to change (another
    generator, another size in the same directory), every point is tuned again."""
    calls = fake_experiment(tmp_path, monkeypatch)
    experiment.main(["--quick", "--seeds", "1"])
    first = len([c for c in calls if c["seed"] == experiment.TUNING_SEED])
    calls.clear()
    experiment.main(["--quick", "--seeds", "1"])
    assert not [c for c in calls if c["seed"] == experiment.TUNING_SEED], "the same split: every score resumed"
    real = experiment.demo.prepare_seed

    def other_split(run, seed, size, template, with_test=True):
        sets = real(run, seed, size, template, with_test)
        dev = run / "data" / "dev.jsonl"
        dev.write_text("".join(dev.read_text().splitlines(keepends=True)[1:]))  # one problem fewer
        return sets

    monkeypatch.setattr(experiment.demo, "prepare_seed", other_split)
    calls.clear()
    experiment.main(["--quick", "--seeds", "1"])
    assert len([c for c in calls if c["seed"] == experiment.TUNING_SEED]) == first


def test_each_method_tunes_a_second_knob_at_its_chosen_rate(tmp_path, monkeypatch):
    """After the rates, every method's second knob (β, the NLL weight, RFT's epochs, ALLO's forget:improve ratio)
    at its chosen rate, on the development split, two runs for all methods at once (each knob moves only its own
    method's sections), then two for the methods tuned after another; a flat knob keeps ×1. The test runs use the
    chosen knobs, and no baseline's β follows DPO's."""
    calls = fake_experiment(tmp_path, monkeypatch)
    experiment.main(["--quick", "--seeds", "1"])
    tuning = [c for c in calls if c["seed"] == experiment.TUNING_SEED and c["command"] == "run"]
    knob_runs = [c["kv"] for c in tuning if c["kv"]["dpo.beta"] != "0.1"][:2]
    assert [kv["dpo.beta"] for kv in knob_runs] == ["0.0333", "0.3"]
    for kv, k, epochs in zip(knob_runs, (1 / 3, 3), ("2", "3")):  # RFT's epochs: 2 and 3 besides its 1
        assert kv["dpo_steps.beta"] == kv["npo.beta"] == f"{0.1 * k:.3g}" and kv["simpo.beta"] == f"{2 * k:.3g}"
        assert kv["dpo_nll.nll_weight"] == f"{k:.3g}" and kv["rft.train.epochs"] == epochs
        assert kv["dpo.train.lr"] == f"{100 * 6e-6:.3g}", "at DPO's chosen rate"
        # the rates reach `allo` with 3 significant digits (each within 0.5%): a ratio of two within 1%
        forget, improve = float(kv["forget.train.lr"]), float(kv["improve.train.lr"])
        assert forget / improve == pytest.approx(5 * k, rel=1e-2), "ALLO's knob: forget's rate against improve's"
    assert all(c["factor"]["forget"] == pytest.approx(0.1 * k, rel=1e-2)
               for c, k in zip([c for c in calls if c["command"] == "ablate" and c["seed"] == 0][-2:], (1 / 3, 3)))
    late = [c["kv"] for c in tuning[tuning.index(next(c for c in tuning if c["kv"]["dpo.beta"] == "0.3")) + 1:]]
    # RFT's knob moved (3 epochs), so RFT-DPO's ×1 is trained again after it, NPO-DPO's is the rate tuning's
    assert [(kv["npo_dpo.beta"], kv["rft_dpo.beta"]) for kv in late] == [("0.0333", "0.0333"), ("0.3", "0.3"),
                                                                         ("0.3", "0.1")]
    assert all(kv["dpo.beta"] == "0.3" and kv["rft.train.epochs"] == "3" for kv in late), "the first at their best"
    result = json.loads((tmp_path / "result.json").read_text())["tuning"]
    assert result["best_knob"]["+DPO"] == 3.0 and result["best_knob"]["+ALLO"] == pytest.approx(1 / 3)
    assert result["best_knob"]["+RFT"] == 3.0 and result["best_knob"]["+RFT-DPO"] == 1.0  # its fresh ×1
    assert result["knob_dev"]["+RFT-DPO"]["1.0"] == pytest.approx(0.405)
    assert {k for label, k in result["best_knob"].items() if label not in ("+DPO", "+ALLO", "+RFT")} == {1.0}
    test_run = next(c["kv"] for c in calls if c["split"] == "test" and c["command"] == "run")
    assert test_run["dpo.beta"] == "0.3" and test_run["dpo_steps.beta"] == "0.1" and test_run["rft_dpo.beta"] == "0.1"
    text = (tmp_path / "table.md").read_text()
    assert "| ×100 (dpo 0.0006); β ×3 (0.3) |" in text and "; forget:improve rate ratio ×0.333 |" in text
    assert "| +RFT | epochs |  | 40.0 | 40.0 | 40.5 |" in text and "| ×1 (rft 0.0003); epochs ×3 (3) |" in text
