"""`allo plan` counts the whole job: eval over every benchmark, generation at a decode-bound rate, locate,
reward scoring, and the teacher's and judge's requests, and suggests a --time from the sum."""
from __future__ import annotations

import json

import pytest

from allo import budget
from allo.config import load_recipe
from allo.plan import Hardware, gpu_hours, plan, verdict


def test_decoding_is_bound_by_memory_then_compute():
    """7e9 16-bit weights (14 GB), no KV cache: 256 sequences read them once a step at half of 3.35 TB/s ->
    256 × 1.675e12 / 14e9 = 30,628.6 tokens/s, below the compute bound 0.35 × 989e12 / 14e9 = 24,725 -> compute
    wins; with 8 sequences the memory bound, 957.1 tokens/s, wins."""
    kw = dict(params=7_000_000_000, kv_width=0, layers=32, seq=1, gpu_bytes=80 * 2 ** 30, bandwidth=3.35e12,
              flops=0.35 * 989e12, vllm=False, utilization=0.9)
    rate, seqs = budget.decode_tokens_per_s(batch=256, **kw)
    assert seqs == 256 and rate == pytest.approx(0.35 * 989e12 / 14e9)
    rate, _ = budget.decode_tokens_per_s(batch=8, **kw)
    assert rate == pytest.approx(8 * 3.35e12 * 0.5 / 14e9)
    # vLLM: at most 256 sequences, and no more than the KV cache left after the weights holds
    rate, seqs = budget.decode_tokens_per_s(**{**kw, "kv_width": 4096, "seq": 4096, "vllm": True, "batch": 10})
    room = int(0.9 * 80 * 2 ** 30) - 14_000_000_000
    assert seqs == room // (2 * 2 * 32 * 4096 * 4096)


def test_time_and_api_arithmetic():
    assert budget.hms(59) == "00:01:00" and budget.hms(3601) == "01:01:00" and budget.hms(26 * 3600) == "1-02:00:00"
    assert budget.suggested_time(3600) == "01:15:00"  # 25% margin
    api = budget.Api("teacher", concurrency=4, price_in=2.5, price_out=10.0)
    api.add(10, 300, 100, "x")
    assert (api.prompt_tokens, api.completion_tokens) == (3000, 1000)
    assert api.usd == pytest.approx((3000 * 2.5 + 1000 * 10.0) / 1e6)
    assert api.wall_s == pytest.approx(3 * (budget.API_LATENCY_S + 100 / budget.API_TOKENS_PER_S))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_plan_counts_eval_locate_scoring_teacher_and_judge(tmp_path, tiny_model):
    problems = _write(tmp_path / "problems.jsonl", [{"prompt": f"p{i}", "answer": "1"} for i in range(30)])
    gsm = _write(tmp_path / "gsm.jsonl", [{"question": f"q{i}", "answer": f"x #### {i}"} for i in range(7)])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "abcd" * 10, "output": "o", "generator": "g"}] * 3))
    endpoint = "{base_url: 'https://x.example/v1', model: m, concurrency: 2, price_in: 1.0, price_out: 2.0}"
    recipe = load_recipe(None, [
        f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model}", f"task.problems={problems}",
        f"task.benchmarks=[gsm8k={gsm}]", f"task.alpaca_eval={alpaca}", "task.eval_max_new_tokens=10",
        "task.max_problems=20", "data.limit=25", "sample.n=4", "sample.max_new_tokens=8",
        "reward.teacher=openai", f"reward.teacher_endpoint={endpoint}", f"task.judge={endpoint}",
        "locate.from_partitions=false", "model.dtype=bf16"])
    hw = Hardware(1, 2, 80 * 2 ** 30, tflops=100.0, mfu=0.5, cpu=True)
    steps = {p.step: p for p in plan(recipe, hw)}
    # eval: SFT + DPO, NPO, SimPO, ALLO = 5 models × (7 gsm8k + 3 AlpacaEval prompts) × 10 tokens
    assert steps["eval"].tokens == 5 * 10 * 10 and "gsm8k 7" in steps["eval"].tokens_source
    # the judge: 4 models against SFT × 3 prompts × 2 orders, one completion token each
    assert steps["eval"].api.requests == 24 and steps["eval"].api.completion_tokens == 24
    # the teacher: min(data.limit 25, task.max_problems 20 × sample.n 4) = 25 wrong responses at most
    assert steps["reward-data"].api.requests == 25 and steps["reward-data"].api.completion_tokens == 25 * 8
    assert steps["reward-data"].wall_s == pytest.approx(13 * (budget.API_LATENCY_S + 8 / budget.API_TOKENS_PER_S))
    assert steps["reward-score"].tokens > 0 and steps["reward-score"].wall_s > 0
    # offline locate: 3 passes over two bf16 checkpoints at the assumed read rate
    from allo.plan import model_config, shape_of

    n = shape_of(model_config(recipe)).params
    assert steps["locate"].wall_s == pytest.approx(3 * 2 * 2 * n / budget.DISK_BYTES_PER_S)
    assert steps["sample"].tokens == 20 * 4 * 8  # task.max_problems caps the problems
    total = sum(p.wall_s for p in steps.values())
    assert sum(gpu_hours(p, hw) for p in steps.values()) == pytest.approx(total * 2 / 3600)
    line = verdict(list(steps.values()), hw)
    assert f"--time {budget.suggested_time(total)}" in line and "teacher 25 requests, judge 24 requests" in line
