"""The evaluation suite: answer checking on the real benchmark samples, loaders, the generate-and-score runner
with a tiny model (resume included), `allo eval score`, and Bradley–Terry against hand-computed cases."""
import json
import math
from dataclasses import replace

import pytest

from allo.cli import main
from allo.config import GenerationConfig
from allo.eval import benchmarks, bradley_terry
from allo.eval.run import EVAL_SAMPLING, evaluate
from allo.tasks import is_correct, last_boxed, math_equal

FILES = {"ecqa": "ecqa/rlmec_test.jsonl", "qasc": "qasc/rlmec_validation.jsonl",
         "openbookqa": "openbookqa/rlmec_test.jsonl", "arc": "arc/rlmec_test.jsonl",
         "strategyqa": "strategyqa/dev_10pct.json", "gsm8k": "gsm8k/test.jsonl", "math": "math/MATH500_test.jsonl",
         "svamp": "math_other/svamp/test.jsonl", "asdiv": "math_other/asdiv/test.jsonl",
         "mawps": "math_other/mawps/test.jsonl", "gsm-hard": "math_other/gsm-hard/test.jsonl"}


def test_gsm8k_gold_checks_against_itself(shared_dir):
    items, _ = benchmarks.load("gsm8k", str(shared_dir / "benchdata" / FILES["gsm8k"]))
    assert len(items) == 1319
    as_predictions = [it["solution"].split("####")[0] + f"The answer is {it['solution'].split('####')[-1].strip()}."
                      for it in items]
    assert sum(is_correct(p, it["answer"]) for p, it in zip(as_predictions, items)) == 1319


@pytest.mark.parametrize("name", ["MATH500_test.jsonl", "MATH_test.jsonl"])
def test_math_gold_checks_against_itself(shared_dir, name):
    items, _ = benchmarks.load("math", str(shared_dir / "benchdata" / "math" / name))
    assert len(items) == {"MATH500_test.jsonl": 500, "MATH_test.jsonl": 5000}[name]
    wrong = [it["id"] for it in items if not is_correct(it["solution"], it["answer"], "math")]
    assert wrong == []


@pytest.mark.parametrize("name", ["ecqa", "qasc", "openbookqa", "arc"])
def test_qa_gold_is_always_an_option_and_checks(shared_dir, name):
    items, src = benchmarks.load(name, str(shared_dir / "benchdata" / FILES[name]))
    assert len(items) > 400 and len(src["sha256"]) == 64
    for it in items:
        options = [o.strip().lower() for o in it["prompt"].split("\nOptions:\n")[1].split("\n")]
        assert it["answer"].strip().lower() in options
        assert is_correct(it["solution"], it["answer"], "qa")
        other = next(o for o in options if o != it["answer"].strip().lower())
        assert not is_correct(f"The answer is {other}.", it["answer"], "qa")


def test_strategyqa_and_other_math_loaders(shared_dir):
    items, _ = benchmarks.load("strategyqa", str(shared_dir / "benchdata" / FILES["strategyqa"]))
    assert {it["answer"] for it in items} == {"yes", "no"} and len(items) == 229
    assert is_correct("So it cannot. The answer is No.", "no", "yesno")
    assert not is_correct("The answer is yes.", "no", "yesno") and not is_correct("The answer is maybe", "no", "yesno")
    for name, first in (("svamp", "145"), ("asdiv", "9"), ("mawps", "43"), ("gsm-hard", "-9867630")):
        items, _ = benchmarks.load(name, str(shared_dir / "benchdata" / FILES[name]))
        assert items[0]["answer"] == first and items[0]["prompt"]


def test_math_equivalence_cases():
    assert math_equal("\\frac{1}{2}", "0.5") and math_equal("0.5", "\\frac12")
    assert math_equal("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")
    assert math_equal("(1, 2)", "\\left( 1, 2 \\right)") and not math_equal("(2, 1)", "(1, 2)")
    assert math_equal("18 dollars", "18") and math_equal("$1,000", "1000") and not math_equal("17", "18")
    assert math_equal("\\boxed{3\\pi}", "3\\pi") and not math_equal("\\pi", "3\\pi")
    assert last_boxed("so \\boxed{\\frac{a}{b}} and \\boxed{x^{2}}") == "x^{2}" and last_boxed("none") is None
    # docs/method.md §6 extraction first, \boxed{} only as the fallback
    assert is_correct("\\boxed{4}. Hmm, the answer is 5.", "5") and is_correct("Thus \\boxed{5}.", "5")


def test_bad_benchmark_input_names_file_line_and_field(tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "x #### 3"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(benchmarks.BenchmarkError, match=r"gsm.jsonl:2: field answer"):
        benchmarks.load("gsm8k", str(f))
    f.write_text("{oops\n")
    with pytest.raises(benchmarks.BenchmarkError, match=r"gsm.jsonl:1: not valid JSON"):
        benchmarks.load("gsm8k", str(f))
    with pytest.raises(benchmarks.BenchmarkError, match="unknown benchmark 'gsm9k'"):
        benchmarks.load("gsm9k", str(f))


def test_a_bad_benchmark_file_stops_before_the_model_loads(tmp_path, capsys, monkeypatch, tiny_model):
    """`allo eval bench` reads every benchmark file whole before it loads the model (whose loading is recorded
    load), and the pipeline's pre-flight does the same before its first step."""
    from allo.cli import main
    from allo.config import load_recipe
    from allo.preflight import InputError, check_eval

    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "x #### 3"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    loaded = []
    monkeypatch.setattr("allo.eval.cli._load", lambda model: loaded.append(model))
    assert main(["eval", "bench", "--model", str(tiny_model), "--benchmark", f"gsm8k={f}",
                 "--out", str(tmp_path / "out")]) == 2
    assert "gsm.jsonl:2: field answer" in capsys.readouterr().err and loaded == []
    with pytest.raises(InputError, match=r"task.benchmarks: .*gsm.jsonl:2: field answer"):
        check_eval(load_recipe(None, [f"task.benchmarks=[gsm8k={f}]"]))


def test_hub_multiple_choice_format():
    rec = {"question_stem": "What melts ice?", "choices": {"text": ["salt", "sand"], "label": ["A", "B"]},
           "answerKey": "A"}
    item = benchmarks.get("openbookqa").normalize(rec)
    assert item == {"prompt": "What melts ice?\nOptions:\nsalt\nsand", "answer": "salt"}


def test_every_benchmark_slice_through_the_eval_with_a_tiny_model(shared_dir, tiny_model, tmp_path, monkeypatch):
    gen, engine = replace(EVAL_SAMPLING, max_new_tokens=6), GenerationConfig(batch_size=4)
    for name, rel in FILES.items():
        r = evaluate(str(tiny_model), name, str(tmp_path), str(shared_dir / "benchdata" / rel), limit=3, sampling=gen,
                     engine=engine)
        assert r["n"] == 3 and r["data"]["sha256"] and r["model"] == str(tiny_model)
        assert r["generation"]["max_new_tokens"] == 6 and r["harness"].startswith("allo ") and r["date"]
        preds = [json.loads(x) for x in (tmp_path / f"{name}.predictions.jsonl").read_text().splitlines()]
        assert len(preds) == 3 and all("output" in p and "correct" not in p for p in preds)
        assert json.loads((tmp_path / f"{name}.result.json").read_text())["accuracy"] == r["accuracy"]
    # resume: the saved predictions are reused, a torn last line is redone
    path = tmp_path / "gsm8k.predictions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    calls = []
    import allo.generate as g
    real = g.generate
    monkeypatch.setattr(g, "generate", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    evaluate(str(tiny_model), "gsm8k", str(tmp_path), str(shared_dir / "benchdata" / FILES["gsm8k"]), 3, gen,
             engine=engine)
    assert calls == [1] and len(path.read_text().splitlines()) == 3
    evaluate(str(tiny_model), "gsm8k", str(tmp_path), str(shared_dir / "benchdata" / FILES["gsm8k"]), 3, gen,
             engine=engine)
    assert calls == [1]


def test_eval_score_cli(tmp_path, capsys):
    preds = tmp_path / "p.jsonl"
    rows = [{"output": "6 + 12 = 18. The answer is 18.", "answer": "18"}, {"generated": "The answer is 7", "answer": 8},
            {"output": "no idea", "answer": "3"}, {"response": "\\boxed{\\frac{1}{2}}", "answer": "0.5"}]
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "score", "--task", "gsm8k", "--predictions", str(preds)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["correct"], out["n"], out["no_answer"], out["accuracy"]) == (2, 4, 1, 50.0)
    preds.write_text(json.dumps({"output": "The answer is 1"}) + "\n")
    assert main(["eval", "score", "--task", "gsm8k", "--predictions", str(preds)]) == 2
    assert "p.jsonl:1: field answer: missing" in capsys.readouterr().err


def test_bradley_terry_hand_computed():
    # two models: the MLE reproduces the observed (weighted, ties halved) win fraction exactly
    battles = [("m", "base", 1.0, 3.0), ("base", "m", 1.0, 1.0), ("m", "base", 0.5, 1.0), ("base", "m", 0.0, 1.0)]
    wins = 3 + 0.5 + 1  # m's weighted wins: strong win (3), tie (0.5), win as B (1)
    expected = wins / 6
    r = bradley_terry.fit(battles, "base")
    assert r["base"] == 1000.0
    assert bradley_terry.win_rate(r["m"], r["base"]) == pytest.approx(expected, abs=1e-6)
    assert r["m"] - 1000 == pytest.approx(400 * math.log10(expected / (1 - expected)), abs=1e-3)
    # a cycle a>b, b>c, c>a: all equal
    r = bradley_terry.fit([("a", "b", 1, 1), ("b", "c", 1, 1), ("c", "a", 1, 1)], "a")
    assert r["b"] == pytest.approx(1000, abs=1e-6) and r["c"] == pytest.approx(1000, abs=1e-6)
    # three models: at the optimum each model's expected wins equal its actual wins
    battles = [("a", "b", 1, 1)] * 3 + [("b", "a", 1, 1)] + [("b", "c", 1, 2), ("c", "b", 0.5, 1), ("a", "c", 0, 1),
                                                                ("a", "c", 1, 1)]
    r = bradley_terry.fit(battles, "c")
    for m in "abc":
        actual = sum(w * (y if a == m else 1 - y) for a, b, y, w in battles if m in (a, b))
        exp = sum(w * (bradley_terry.win_rate(r[a], r[b]) if a == m else bradley_terry.win_rate(r[b], r[a]))
                  for a, b, y, w in battles if m in (a, b))
        assert exp == pytest.approx(actual, abs=1e-4)
    s = bradley_terry.scores(battles, "c", rounds=50, groups=[str(i) for i in range(len(battles))])
    assert s["c"]["score"] == 50.0 and s["a"]["ci95"][0] <= s["a"]["score"] <= s["a"]["ci95"][1]


def test_answer_files_in_alpaca_eval_and_arena_formats(shared_dir, tiny_model, tmp_path, capsys):
    from allo.eval import instruct

    bench = shared_dir / "benchdata"
    alpaca_out, arena_out = tmp_path / "model_outputs.json", tmp_path / "answers.jsonl"
    common = ["--model", str(tiny_model), "--template", "alpaca", "--max-new-tokens", "4", "--limit", "3"]
    assert main(["eval", "answer", *common, "--alpaca", str(bench / "alpaca_eval/gpt4_1106_preview_model_outputs.json"),
                 "--out", str(alpaca_out), "--name", "tiny"]) == 0
    rows = instruct.read_alpaca_outputs(str(alpaca_out))
    reference = instruct.read_alpaca_outputs(str(bench / "alpaca_eval/gpt4_1106_preview_model_outputs.json"))
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in reference[:3]]
    assert {r["generator"] for r in rows} == {"tiny"}
    assert main(["eval", "answer", *common, "--arena", str(bench / "arena_hard/v0.1/question.jsonl"),
                 "--out", str(arena_out)]) == 0
    answers = instruct.read_arena_answers(str(arena_out))
    baseline = instruct.read_arena_answers(str(bench / "arena_hard/v0.1/model_answer/gpt-4-0314.jsonl"))
    assert len(answers) == 3 and set(answers) <= set(baseline)
    questions = instruct.read_arena_questions(str(bench / "arena_hard/v0.1/question.jsonl"))
    assert instruct.arena_version(questions) == "v0.1"
    assert instruct.arena_version(instruct.read_arena_questions(str(bench / "arena_hard/v2.0/question.jsonl"))) == "v2.0"
    capsys.readouterr()


def test_report_renders_table2_from_result_files(shared_dir, tiny_model, tmp_path, capsys):
    gen, engine = replace(EVAL_SAMPLING, max_new_tokens=4), GenerationConfig(batch_size=4)
    for model in ("sft", "allo"):
        for name in ("ecqa", "strategyqa", "gsm8k"):
            evaluate(str(tiny_model), name, str(tmp_path / "eval" / model), str(shared_dir / "benchdata" / FILES[name]),
                     limit=2, sampling=gen, engine=engine)
    # make the numbers distinguishable: rewrite ALLO's GSM8K accuracy in its result file
    f = tmp_path / "eval" / "allo" / "gsm8k.result.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "accuracy": 50.0}))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("|")]
    assert lines[0] == "| method | ECQA | SQA | QA avg | GSM8K | Math avg |"
    sft = json.loads((tmp_path / "eval" / "sft" / "ecqa.result.json").read_text())["accuracy"]
    sqa = json.loads((tmp_path / "eval" / "sft" / "strategyqa.result.json").read_text())["accuracy"]
    assert lines[2].startswith(f"| SFT LLM | {sft:.2f} | {sqa:.2f} | {(sft + sqa) / 2:.2f} |")
    assert lines[3].startswith("| +ALLO |") and lines[3].endswith("| 50.00 | 50.00 |")
    assert (tmp_path / "report" / "tables.md").exists()
