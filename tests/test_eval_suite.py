"""`allo eval suite`: a suite file run on two tiny models against the real benchmark samples and a judge on loopback.

Its results are where `allo report` reads them, equal to what the single-benchmark commands (`allo eval bench`,
`answer`, `alpaca`, `arena`) give on the same models; a rerun generates nothing; two shards plus `--only judge` give
the same tables as one process; bad suite files and arguments are refused with their place.
"""
from __future__ import annotations

import json
import math
import re

import pytest

from allo.cli import main
from tests.chat_server import ChatServer, ok
from tiny import make_model_dir


def longer_wins(body, n):
    """A judge that prefers the longer answer: AlpacaEval's m/M with logprobs, Arena-Hard's verdict label."""
    text = body["messages"][-1]["content"]
    if "<|The Start of Assistant A's Answer|>" in text:
        a = text.split("<|The Start of Assistant A's Answer|>\n")[1].split("\n<|The End of Assistant A's Answer|>")[0]
        b = text.split("<|The Start of Assistant B's Answer|>\n")[1].split("\n<|The End of Assistant B's Answer|>")[0]
        return ok("My final verdict is [[A>B]]" if len(a) > len(b) else "My final verdict is [[B>>A]]"
                  if len(b) > len(a) else "My final verdict is tie: [[A=B]]")
    m, big_m = re.findall(r'"output": """(.*?)"""', text, re.S)
    p = 0.8 if len(big_m) > len(m) else 0.2 if len(big_m) < len(m) else 0.5
    return ok("M", logprobs={"content": [{"token": "M", "logprob": math.log(p), "top_logprobs": [
        {"token": "M", "logprob": math.log(p)}, {"token": "m", "logprob": math.log(1 - p)}]}]})


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model):
    return {"sft": str(tiny_model), "other": str(make_model_dir(tmp_path_factory.mktemp("other"), seed=1))}


@pytest.fixture()
def judge():
    s = ChatServer(longer_wins)
    yield s
    s.close()


@pytest.fixture()
def suite_file(tmp_path, shared_dir, judge):
    b = shared_dir / "benchdata"
    path = tmp_path / "suite.yaml"
    path.write_text(f"""name: mixed
benchmarks: [gsm8k={b}/gsm8k/test.jsonl, ecqa={b}/ecqa/rlmec_test.jsonl]
alpaca_eval: {b}/alpaca_eval/gpt4_1106_preview_model_outputs.json
arena_hard: {b}/arena_hard/v0.1/question.jsonl
arena_baseline: {b}/arena_hard/v0.1/model_answer/gpt-4-0314.jsonl
template: raw
max_new_tokens: 6
limit: 3
generation: {{batch_size: 4}}
judge: {{base_url: "{judge.url}", model: gpt-4-1106-preview, api_key_env: null}}
""")
    return path


def run(capsys, *args) -> dict:
    code = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return json.loads(captured.out)


def test_suite_matches_the_single_commands_and_report(tmp_path, suite_file, models, judge, capsys):
    out = tmp_path / "out"
    res = run(capsys, "suite", suite_file, "--out", out, "--model", f"sft={models['sft']}",
              "--model", f"other={models['other']}")
    t3 = res["table3"]
    assert t3["_baseline"] == "gpt4_1106_preview" and set(t3) >= {"sft", "other", "gpt4_1106_preview"}
    for label, path in models.items():
        d = tmp_path / "single" / label
        bench = run(capsys, "bench", "--model", path, "--benchmark", f"gsm8k={_bench(suite_file, 'gsm8k')}",
                    f"ecqa={_bench(suite_file, 'ecqa')}", "--out", d, "--limit", 3, "--template", "raw",
                    "--max-new-tokens", 6)
        assert res["table2"][label] == {k: v["accuracy"] for k, v in bench.items()}
        for f in ("gsm8k.predictions.jsonl", "ecqa.predictions.jsonl"):
            assert (out / "eval" / label / f).read_text() == (d / f).read_text()
        run(capsys, "answer", "--model", path, "--alpaca", _key(suite_file, "alpaca_eval"), "--out", d / "a.json",
            "--name", label, "--template", "raw", "--max-new-tokens", 6, "--limit", 3)
        alpaca = run(capsys, "alpaca", "--model-outputs", d / "a.json", "--baseline", _key(suite_file, "alpaca_eval"),
                     "--out", d / "ae", "--judge-url", judge.url, "--judge-model", "gpt-4-1106-preview",
                     "--judge-key-env", "none")
        assert t3[label]["alpaca_eval"] == round(alpaca["win_rate"], 2)
        run(capsys, "answer", "--model", path, "--arena", _key(suite_file, "arena_hard"), "--out", d / "a.jsonl",
            "--name", label, "--template", "raw", "--max-new-tokens", 6, "--limit", 3)
        arena = run(capsys, "arena", "--questions", _key(suite_file, "arena_hard"), "--baseline",
                    _key(suite_file, "arena_baseline"), "--answers", d / "a.jsonl", "--out", d / "ah", "--limit", 3,
                    "--judge-url", judge.url, "--judge-model", "gpt-4-1106-preview", "--judge-key-env", "none")
        assert t3[label]["arena_hard"] == arena["score"]
    tables = res["tables"]
    assert "| sft |" in tables and "| other |" in tables and "against gpt4_1106_preview's answers" in tables
    from allo.report import report

    assert (out / "report" / "tables.md") in report(out)

    calls = len(judge.bodies)
    again = run(capsys, "suite", suite_file, "--out", out, "--model", f"sft={models['sft']}",
                "--model", f"other={models['other']}")
    assert again["table2"] == res["table2"] and again["table3"]["sft"] == t3["sft"]
    assert len(judge.bodies) == calls, "a rerun is served by the predictions on disk and the judge cache"


def test_two_shards_then_judge_equal_one_process(tmp_path, suite_file, models, capsys):
    args = [suite_file, "--model", f"sft={models['sft']}", "--model", f"other={models['other']}",
            "--set", "baseline=first", "--set", "benchmarks=[]"]
    whole = run(capsys, "suite", *args, "--out", tmp_path / "whole")
    for i in (0, 1):
        part = run(capsys, "suite", *args, "--out", tmp_path / "parts", "--only", "generate", "--shard", f"{i}/2")
        assert list(part["models"]) == [["sft", "other"][i]] and "table3" not in part
    run(capsys, "suite", *args, "--out", tmp_path / "only-sft", "--only", "generate", "--shard", "0/2")
    with pytest.raises(AssertionError, match="run `allo eval suite` with --only generate for model 'other'"):
        run(capsys, "suite", *args, "--out", tmp_path / "only-sft", "--only", "judge")
    joined = run(capsys, "suite", *args, "--out", tmp_path / "parts", "--only", "judge")
    assert joined["table3"]["other"] == whole["table3"]["other"] and whole["table3"]["sft"]["alpaca_eval"] == 50.0
    assert joined["table3"]["_baseline"] == "sft"


@pytest.mark.parametrize("text,problem", [
    ("name: x\nbenchmark: [gsm8k]\n", r"suite.yaml:2: benchmark: unknown key \(allowed: name, benchmarks"),
    ("name: x\nlimit: 0\n", r"suite.yaml:2: limit: 0 is out of range"),
    ("name: x\n", r"suite.yaml: nothing to evaluate"),
    ("arena_hard: q.jsonl\n", r"arena_hard with baseline: reference needs arena_baseline"),
])
def test_bad_suite_files_name_their_place(tmp_path, capsys, text, problem):
    (tmp_path / "suite.yaml").write_text(text)
    assert main(["eval", "suite", str(tmp_path / "suite.yaml"), "--model", "m"]) == 2
    assert re.search(problem, capsys.readouterr().err)


def test_bad_models_and_shards(tmp_path, suite_file, models, capsys):
    for args, problem in [(["--model", models["sft"], "--model", f"{models['sft']}"], "label .* is given twice"),
                          (["--model", models["sft"], "--shard", "2/2"], r"--shard '2/2': expected I/N"),
                          (["--model", str(tmp_path / "nope")], "nope")]:
        assert main(["eval", "suite", str(suite_file), "--out", str(tmp_path / "o"), *args]) == 2
        assert re.search(problem, capsys.readouterr().err)


def _key(suite_file, key: str) -> str:
    return re.search(rf"^{key}: (\S+)$", suite_file.read_text(), re.M).group(1)


def _bench(suite_file, name: str) -> str:
    return re.search(rf"{name}=([^,\]]+)", suite_file.read_text()).group(1)
