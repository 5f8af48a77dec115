"""`allo run` on instruction-following pairs (task.pairs, family instruct) with the LLM teacher and the judge
behind an OpenAI-compatible server on loopback: 2 ranks, ZeRO-3, every step (masks located from the warm-up run's
partitions), Table 3 against the SFT model."""
from __future__ import annotations

import json
import math

import pytest

from conftest import torchrun, write_recipe
from tests.chat_server import ChatServer, ok

pytestmark = pytest.mark.slow


def reply(body, n):
    if body["model"] == "teacher":  # a "minimum edit": the reference response itself
        user = body["messages"][-1]["content"]
        return ok("```\n" + user.split("Reference response (correct):\n")[1].split("\n\nWrong response:")[0] + "\n```")
    return ok("M", logprobs={"content": [{"token": "M", "logprob": math.log(0.6), "top_logprobs": [
        {"token": "M", "logprob": math.log(0.6)}, {"token": "m", "logprob": math.log(0.4)}]}]})


@pytest.fixture()
def server():
    s = ChatServer(reply)
    yield s
    s.close()


def test_instruct_pipeline_with_llm_teacher_and_judge(tmp_path, tiny_model, pairs_file, server):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Tom has {i} apples. How many?", "output": "x", "generator": "g"}
                                  for i in range(3)]))
    endpoint = f"{{base_url: '{server.url}', api_key_env: null, model: %s}}"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "run", extra=f"""
task: {{pairs: {pairs_file}, family: instruct, alpaca_eval: {alpaca}, eval_max_new_tokens: 4,
        judge: {endpoint % 'judge'}}}
reward: {{teacher: openai, teacher_endpoint: {endpoint % 'teacher'}, max_length: 128, max_prompt_length: 96,
          train: {{epochs: 1, lr: 1.0e-3, global_batch_size: 8}}}}
locate: {{forget_ratio: 10, improve_ratio: 15, from_partitions: true}}
warmup: {{train: {{lr: 1.0e-3}}}}
""")
    torchrun(["run", str(recipe)], timeout=600)
    run = tmp_path / "run"
    assert json.loads((run / "sample" / "manifest.json").read_text())["skipped"].startswith("task.pairs")
    # the masks came from the warm-up run's ZeRO-3 partitions and the locate step took them over
    assert json.loads((run / "locate" / "manifest.json").read_text())["from_partitions"] is True
    assert json.loads((run / "locate" / "n2.json").read_text())["from_partitions"] is True
    assert json.loads((run / "pairs" / "manifest.json").read_text())["pairs"] == 32
    data = json.loads((run / "reward-data" / "manifest.json").read_text())
    assert (data["items"], data["kept"], data["teacher_failed"]) == (32, 32, 0)
    rewrites = [json.loads(x) for x in (run / "reward-data" / "reward.jsonl").read_text().split("\n") if x]
    pairs = [json.loads(x) for x in (run / "pairs" / "pairs.jsonl").read_text().split("\n") if x]
    assert rewrites[0]["response"] == pairs[0]["chosen"].strip()  # the fence the teacher added is gone
    teacher_calls = sum(b["model"] == "teacher" for b in server.bodies)
    assert teacher_calls == 32 and len(list((run / "reward-data" / "cache").rglob("*.json"))) == 32
    results = json.loads((run / "eval" / "results.json").read_text())
    t3 = results["table3"]
    assert t3["SFT"]["alpaca_eval"] == 50.0
    # the judge says P(second better) = 0.6 in both orders: the swap protocol averages 0.6 and 0.4 -> 50%
    assert all(t3[m]["alpaca_eval"] == pytest.approx(50.0) for m in ("+DPO", "+NPO", "+ALLO"))
    assert results["harness"].startswith("allo") and "date" in results
    # rerunning reward-data answers every rewrite from the teacher cache
    n = len(server.bodies)
    torchrun(["run", str(recipe), "--from", "reward-data", "--only", "reward-data"], timeout=300)
    assert sum(b["model"] == "teacher" for b in server.bodies[n:]) == 0
