"""AlpacaEval and Arena-Hard judging against a judge server on loopback: verdict parsing, position swap, retries
of unparseable judgments, cache, and the scores that come out (hand-computed)."""
import json
import math

import pytest

from allo.cli import main
from allo.eval import judges
from allo.openai_client import ChatClient, Endpoint
from tests.chat_server import ChatServer, ok


def logprobs(p_M: float) -> dict:
    return {"content": [{"token": "M", "logprob": math.log(p_M), "top_logprobs": [
        {"token": "M", "logprob": math.log(p_M)}, {"token": "m", "logprob": math.log(1 - p_M)},
        {"token": "Both", "logprob": -9.0}]}]}


def alpaca_judge(body, n):
    """Prefers the output containing GOOD with probability 0.9; without one, a position bias: P(M) = 0.7."""
    text = body["messages"][-1]["content"]
    first, second = text.split('"model_identifier": "m"')[1], text.split('"model_identifier": "M"')[1]
    first = first.split('"model_identifier": "M"')[0]
    p = 0.9 if "GOOD" in second and "GOOD" not in first else 0.1 if "GOOD" in first and "GOOD" not in second else 0.7
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 5
    return ok("M" if p > 0.5 else "m", logprobs=logprobs(p))


@pytest.fixture()
def judge(request):
    server = ChatServer(request.param)
    yield server
    server.close()


def client(server, tmp_path):
    return ChatClient(Endpoint(base_url=server.url, model="judge", api_key_env=None),
                      cache_dir=str(tmp_path / "cache"))


def test_alpaca_template_comes_from_the_installed_package():
    msgs = judges.alpaca_messages("Say hi", "hi", "hello")
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert '"""Say hi"""' in msgs[1]["content"] and '"output": """hello"""' in msgs[1]["content"]


@pytest.mark.parametrize("judge", [alpaca_judge], indirect=True)
def test_alpaca_protocols_and_scores(judge, tmp_path):
    c = client(judge, tmp_path)
    ins = [f"task {i}" for i in range(40)]
    good = judges.alpaca_pairs(c, ins, ["plain"] * 40, ["GOOD"] * 40, "base", "ours", "official")
    assert all(a["preference"] == pytest.approx(1.9) for a in good)  # right in both presentation orders
    # two equal outputs: the position-biased judge says "second" with 0.7; swapping averages it out exactly
    swap = judges.alpaca_pairs(c, ins, ["same"] * 40, ["same"] * 40, "base", "ours", "swap")
    assert all(a["preference"] == pytest.approx(1.5) for a in swap)
    official = judges.alpaca_pairs(c, ins, ["same"] * 40, ["same"] * 40, "base", "ours", "official")
    shown_first = sum(judges._swapped(i, 0) for i in ins)
    assert 0 < shown_first < 40  # the official protocol randomises the order, seeded
    assert sum(a["preference"] - 1 for a in official) == pytest.approx(0.3 * shown_first + 0.7 * (40 - shown_first))
    calls = len(judge.bodies)
    judges.alpaca_pairs(client(judge, tmp_path), ins, ["same"] * 40, ["same"] * 40, "base", "ours", "swap")
    assert len(judge.bodies) == calls  # all cached
    metrics, _ = judges.alpaca_score(good)
    assert metrics["win_rate"] == pytest.approx(90.0) and metrics["n_unusable"] == 0


def test_alpaca_score_cli_hand_computed(tmp_path, capsys):
    ann = [{"instruction": f"i{k}", "output_1": "a", "output_2": "b" * k, "generator_1": "base", "generator_2": "m",
            "preference": p} for k, p in enumerate([2, 1, 1.5, 2, 1.75])]
    f = tmp_path / "annotations.json"
    f.write_text(json.dumps(ann))
    assert main(["eval", "alpaca-score", str(f)]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["win_rate"] == pytest.approx(100 * (1 + 0 + 0.5 + 1 + 0.75) / 5)
    assert out["n_wins"] == 3 and out["n_draws"] == 1  # 1.75 counts as a win, 1.5 as a draw, in alpaca_eval
    # offline (conftest sets HF_HUB_OFFLINE, as CI has no hub): one line says why LC is missing
    assert "length_controlled_winrate" not in out
    assert captured.err.count("\n") == 1 and "length-controlled win rate unavailable" in captured.err


def test_alpaca_length_controlled_offline_from_a_local_file(tmp_path, capsys):
    """HF_HUB_OFFLINE is honoured (the note names it and the way out); a local copy of the hub's df_gamed.csv (here a
    synthetic one in its layout) gives the length-controlled win rate with no hub, given as the file or its folder."""
    import random

    rng = random.Random(0)
    ann = [{"instruction": f"i{k}", "output_1": "a" * rng.randint(5, 300), "output_2": "b" * rng.randint(5, 300),
            "generator_1": "base", "generator_2": "m", "annotator": "j", "preference": 2 if k % 7 >= 3 else 1}
           for k in range(60)]  # the model wins the hard instructions of the first file's difficulty
    f = tmp_path / "annotations.json"
    f.write_text(json.dumps(ann))

    def gamed(path, period: int):
        rows = [(m, i, rng.choice([0.0, 1.0]), rng.uniform(-2, 2), (i % period - 3) / 3) for m in ("g1", "g2")
                for i in range(len(ann))]
        path.write_text("model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline\n" + "".join(
            f"{m},{i},{p},{d:.4f},{h:.4f},False\n" for m, i, p, d, h in rows))
        return path

    local = gamed(tmp_path / "df_gamed.csv", 7)
    metrics, note = judges.alpaca_score(ann)
    assert "length_controlled_winrate" not in metrics and "HF_HUB_OFFLINE is set" in note and "--difficulty" in note
    results = []
    for given in (local, tmp_path):
        assert main(["eval", "alpaca-score", str(f), "--difficulty", str(given)]) == 0
        captured = capsys.readouterr()
        assert captured.err == ""  # no note, no warning
        results.append(json.loads(captured.out)["length_controlled_winrate"])
    assert 0 < results[0] < 100 and results[0] == pytest.approx(results[1])
    (tmp_path / "other").mkdir()
    other, _ = judges.alpaca_score(ann, str(gamed(tmp_path / "other" / "df_gamed.csv", 4)))
    assert other["length_controlled_winrate"] != pytest.approx(results[0])  # the file's data is what is used
    metrics, note = judges.alpaca_score(ann, str(tmp_path / "nowhere"))
    assert f"{tmp_path / 'nowhere'} (FileNotFoundError" in note and "length_controlled_winrate" not in metrics


def arena_judge(body, n):
    """A verdict from which answer holds GOOD; the question 'flaky' gets a verdict only on its second try."""
    text = body["messages"][-1]["content"]
    a = text.split("<|The Start of Assistant A's Answer|>")[1].split("<|The End of Assistant A's Answer|>")[0]
    b = text.split("<|The Start of Assistant B's Answer|>")[1].split("<|The End of Assistant B's Answer|>")[0]
    assert body["messages"][0]["role"] == "system" and "[[A>>B]]" in body["messages"][0]["content"]
    if "flaky" in text and n == 1:
        return ok("I cannot decide. [[A>B]] or maybe [[B>A]]")
    if "GOOD" in a and "GOOD" not in b:
        return ok("My final verdict is: [[A>>B]]")
    if "GOOD" in b and "GOOD" not in a:
        return ok("My final verdict is: [[B>A]]")
    return ok("My final verdict is tie: [[A=B]]")


def test_parse_verdict():
    assert judges.parse_verdict("blah [[B>>A]]. So [[B>>A]]") == "B>>A"
    assert judges.parse_verdict("[[A>B]] vs [[B>A]]") is None and judges.parse_verdict("no label") is None
    assert judges.parse_verdict("[[C]]") is None


@pytest.mark.parametrize("judge", [arena_judge], indirect=True)
def test_arena_end_to_end(judge, tmp_path, capsys):
    qs = [{"uid": f"q{i}", "category": "arena-hard-v0.1", "prompt": "flaky" if i == 0 else f"question {i}"}
          for i in range(4)]
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    from allo.eval.instruct import write_arena_answers

    write_arena_answers(str(tmp_path / "base.jsonl"), qs, ["GOOD base", "plain", "same", "same"], "gpt-4-0314")
    write_arena_answers(str(tmp_path / "model.jsonl"), qs, ["plain", "GOOD", "same", "GOOD"], "ours")
    args = ["eval", "arena", "--questions", str(tmp_path / "question.jsonl"), "--baseline",
            str(tmp_path / "base.jsonl"), "--answers", str(tmp_path / "model.jsonl"), "--out", str(tmp_path / "out"),
            "--judge-url", judge.url, "--judge-model", "judge", "--judge-key-env", "none", "--bootstrap", "20",
            "--judge-prompt", "allo"]  # allo's parsing: a double verdict is asked again (the official takes the last)
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    # games (A, B): q0 base better: game1 A>>B (base, w3), game2 B>A (base, w1); q1 model better: game1 B>A
    # (model, w1), game2 A>>B (model, w3); q2 tie, tie; q3 model better: w1 + w3. The model's weighted wins:
    # 0 + 4 + (0.5 + 0.5) + 4 = 9 of 4 + 4 + 2 + 4 = 14 -> the two-model BT score is 9/14.
    assert res["score"] == pytest.approx(100 * 9 / 14, abs=0.01)
    assert res["games"] == 8 and res["games_without_verdict"] == 0 and res["arena_hard_version"] == "v0.1"
    assert res["ci95"][0] <= res["score"] <= res["ci95"][1] and res["baseline"] == "gpt-4-0314"
    assert judge.seen[next(k for k in judge.seen if "flaky" in k)] >= 2  # asked again after the double verdict
    n = len(judge.bodies)
    assert main(args) == 0 and len(judge.bodies) == n  # rerun: every judgment from the cache
    capsys.readouterr()


def official_judge(body, n):
    return ok("Thinking about [[A>B]] first... no. Final verdict: [[B>A]]")


@pytest.mark.parametrize("judge", [official_judge], indirect=True)
def test_arena_official_prompts_parsing_and_setup(judge, tmp_path, capsys):
    """By default the leaderboard's setup of the question file's version: its judge prompt per category (verbatim
    from arena-hard-auto), its verdict parsing (the last label of the first matching pattern), its token budget,
    and whether the run is comparable with the leaderboard (official baseline and judge)."""
    from allo.eval.instruct import write_arena_answers

    for version, qs, base, budget in (
            ("v0.1", [{"uid": "a", "category": "arena-hard-v0.1", "prompt": "q a"}], "gpt-4-0314", 4096),
            ("v2.0", [{"uid": "b", "category": "hard_prompt", "prompt": "q b"},
                      {"uid": "c", "category": "creative_writing", "prompt": "q c"}], "o3-mini-2025-01-31", 16000)):
        d = tmp_path / version
        d.mkdir()
        (d / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
        write_arena_answers(str(d / "base.jsonl"), qs, ["x"] * len(qs), base)
        write_arena_answers(str(d / "model.jsonl"), qs, ["y"] * len(qs), "ours")
        start = len(judge.bodies)
        assert main(["eval", "arena", "--questions", str(d / "question.jsonl"), "--baseline", str(d / "base.jsonl"),
                     "--answers", str(d / "model.jsonl"), "--out", str(d / "out"), "--judge-url", judge.url,
                     "--judge-model", judges.ARENA_VERSIONS[version]["judge"], "--judge-key-env", "none",
                     "--bootstrap", "5"]) == 0
        res = json.loads(capsys.readouterr().out)
        bodies = judge.bodies[start:]
        assert len(bodies) == 2 * len(qs) and all(b["max_tokens"] == budget for b in bodies)
        prompts = {b["messages"][1]["content"].split("\n")[1]: b["messages"][0]["content"] for b in bodies}
        assert prompts["q a" if version == "v0.1" else "q b"] == judges.ARENA_OFFICIAL
        if version == "v2.0":
            assert prompts["q c"] == judges.ARENA_OFFICIAL_CREATIVE and "your own answer" not in prompts["q c"]
        games = [json.loads(x) for x in (d / "out" / "judgments.jsonl").read_text().splitlines()]
        assert {g["verdict"] for g in games} == {"B>A"}  # the last label, asked once
        assert res["system_prompt"] == f"arena-hard-auto official ({version})"
        assert res["leaderboard_comparable"] is (version == "v0.1")  # v2.0's creative baseline is another model
    assert judges.official_verdict("my verdict: [a>>b]") == "A>>B" and judges.official_verdict("none") is None


@pytest.mark.parametrize("judge", [alpaca_judge], indirect=True)
def test_an_empty_answer_is_never_sent_to_the_judge(judge, tmp_path, caplog):
    """An empty (or blank) answer loses without a judge call, two tie; the log counts them."""
    import logging

    c = client(judge, tmp_path)
    with caplog.at_level(logging.INFO, logger="allo.eval.judges"):
        ann = judges.alpaca_pairs(c, ["a", "b", "c", "d"], ["plain", " ", "", "plain"], ["", "GOOD", "  ", "GOOD"],
                                  "base", "ours", "swap")
    assert [a["preference"] for a in ann[:3]] == [1.0, 2.0, 1.5] and ann[3]["preference"] == pytest.approx(1.9)
    assert len(judge.bodies) == 2 and all("GOOD" in b["messages"][-1]["content"] for b in judge.bodies)
    assert "3 of 4 items have an empty answer" in caplog.text
    games = judges.arena_games(c, [{"uid": "u", "prompt": "q"}], {"u": "an answer"}, {"u": " "})
    assert [g["verdict"] for g in games] == ["A>>B", "B>>A"] and len(judge.bodies) == 2  # the baseline wins both
