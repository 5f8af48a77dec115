"""Steps that are not training run on every rank (allo.sharding): with a process-group timeout of 3 s and one rank
made slower than that, sample, reward-data, reward-score and eval (held-out problems and a benchmark) complete on
2 ranks and write exactly what one rank writes; a SIGTERM mid-step stops it for a requeue, and the rerun finishes the missing units only."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import pytest

from allo.launch import torchrun_command
from allo.tasks.arith import make_splits
from conftest import ENV, ROOT, torchrun

pytestmark = pytest.mark.slow
STEPS = ("sample", "reward-data", "reward-score", "eval")


def setup_run(tmp_path, tiny_model, name: str) -> tuple[list[str], "Path"]:  # noqa: F821
    """A run dir whose upstream outputs exist (pairs, a reward model), and the `allo run` arguments for it."""
    problems, test = make_splits(24, 10, seed=3)
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        (data / "problems.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"], "answer": p["answer"],
                                                                 "reference": p["response"]}) + "\n"
                                                     for p in problems))
        (data / "test.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"], "answer": p["answer"]}) + "\n"
                                                 for p in test))
        (data / "gsm8k.jsonl").write_text("".join(json.dumps({"question": p["prompt"], "answer": f"#### {p['answer']}"})
                                                  + "\n" for p in problems[:9]))
    run = tmp_path / name
    (run / "pairs").mkdir(parents=True)
    (run / "pairs" / "pairs.jsonl").write_text("".join(json.dumps({
        "prompt": p["prompt"], "chosen": p["response"], "rejected": p["response"].replace("answer is", "answer is 1"),
        "answer": p["answer"], "reference": p["response"]}) + "\n" for p in problems))
    (run / "pairs" / "wrong.jsonl").write_text("".join(json.dumps({
        "prompt": p["prompt"], "rejected": p["response"].replace("answer is", "answer is 1"), "answer": p["answer"],
        "reference": p["response"]}) + "\n" for p in problems))
    shutil.copytree(tiny_model, run / "reward-train" / "model")
    sets = [f"output_dir={run}", f"model.path={tiny_model}", f"task.problems={data / 'problems.jsonl'}",
            f"task.eval={data / 'test.jsonl'}", "sample.n=3", "sample.max_new_tokens=12", "task.eval_max_new_tokens=8",
            "generation.batch_size=6", "distributed.timeout_minutes=0.05", "data.template=alpaca_cot",
            f"task.benchmarks=[gsm8k={data / 'gsm8k.jsonl'}]"]
    return [x for s in sets for x in ("--set", s)], run


def outputs(run) -> dict[str, bytes]:
    files = {"sample": "samples.jsonl", "reward-data": "reward.jsonl", "reward-score": "forget.jsonl"}
    out = {s: (run / s / f).read_bytes() for s, f in files.items()}
    results = json.loads((run / "eval" / "results.json").read_text())
    out["eval"] = json.dumps([results["accuracy"], results["table2"]]).encode()
    out["predictions"] = (run / "eval" / "sft" / "gsm8k.predictions.jsonl").read_bytes()
    return out


def test_two_ranks_one_slow_write_what_one_rank_writes(tmp_path, tiny_model):
    args1, run1 = setup_run(tmp_path, tiny_model, "one")
    args2, run2 = setup_run(tmp_path, tiny_model, "two")
    torchrun(["run", "--only", ",".join(STEPS)] + args1, nproc=1)
    # rank 1 sleeps 1.5 s before each of its units: rank 0 waits for it far longer than the 3 s timeout
    torchrun(["run", "--only", ",".join(STEPS)] + args2, env=dict(ENV, ALLO_TEST_SLOW_RANK="1:1.5"))
    a, b = outputs(run1), outputs(run2)
    for what in a:
        assert a[what] == b[what], what
    samples = [json.loads(x) for x in a["sample"].decode().splitlines()]
    assert len(samples) == 24 * 3 and not (run2 / "sample" / "shards").exists()
    manifest = json.loads((run2 / "reward-score" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["responses"] == 24


def test_sigterm_mid_step_requeues_and_resumes_the_missing_units(tmp_path, tiny_model):
    args, run = setup_run(tmp_path, tiny_model, "stopped")
    ref_args, ref = setup_run(tmp_path, tiny_model, "straight")
    torchrun(["run", "--only", "sample"] + ref_args)
    cmd = torchrun_command(["run", "--only", "sample"] + args, 2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(ENV, ALLO_TEST_SLOW_RANK="0:1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(f.read_text().count("\n") >= 1
                                             for f in (run / "sample" / "shards").glob("*/rank0-of-2.jsonl")):
        time.sleep(0.05)
    (shard,) = (run / "sample" / "shards").glob("*/rank0-of-2.jsonl")  # under the step's fingerprint
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks, as Slurm signals every process
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    assert (run / "sample" / "preempted.json").exists(), out[-3000:]
    assert not (run / "sample" / "samples.jsonl").exists()
    kept = shard.read_text().count("\n")
    assert 2 <= kept < 12  # rank 0's share: 6 units of 2 problems (batch 6 / n 3), some of them finished
    done = torchrun(["run", "--only", "sample"] + args)
    assert "already done (resumed)" in done.stderr
    assert (run / "sample" / "samples.jsonl").read_bytes() == (ref / "sample" / "samples.jsonl").read_bytes()


def test_a_failure_on_rank_0_stops_the_waiting_rank_at_once(tmp_path, tiny_model):
    """pairs runs on rank 0 alone; when it fails (its samples file is damaged), rank 1, waiting on a file, fails
    with rank 0's message within seconds instead of waiting out distributed.wait_minutes (10 min here); the
    terminal shows the failure once."""
    args, run = setup_run(tmp_path, tiny_model, "failing")
    (run / "sample").mkdir()
    (run / "sample" / "samples.jsonl").write_text("{not json\n")
    t0 = time.time()
    proc = torchrun(["run", "--only", "pairs", "--set", "distributed.wait_minutes=10"] + args, check=False)
    assert proc.returncode != 0 and time.time() - t0 < 120
    assert proc.stderr.count("step pairs failed") == 1, proc.stderr[-3000:]  # shown by the rank that failed
    assert "samples.jsonl:1: not valid JSON" in proc.stderr
