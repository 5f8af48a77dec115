"""The SLURM launcher against a real Slurm (controller + 2 node daemons on this host).

1. `slurm/submit.sh` runs a DPO stage as one ZeRO-3 job across both nodes (one process per node).
2. A second submission gets SIGUSR1 early (as Slurm sends before a time limit): it checkpoints, requeues, resumes
   and ends with the same weights as the first.
Runs when root (it installs Debian's slurm packages if missing) or when Slurm is already running.
"""
from __future__ import annotations

import json
import re
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, ROOT, job_state, sh, wait_for, write_recipe

pytestmark = pytest.mark.slow


def submit(recipe, pairs, model, logs) -> str:
    env = dict(ENV, ALLO_LOG_DIR=str(logs), ALLO_PYTHON=sys.executable)
    out = sh("bash", "slurm/submit.sh", str(recipe), "--stage", "dpo", "--nodes", "2", "--gpus-per-node", "1",
             "--cpu", "--", "--data", str(pairs), "--init", str(model), cwd=ROOT, env=env)
    assert "global batch 8 = micro 2 × accumulation 2 × world 2" in out
    return out.splitlines()[-1]


def test_two_node_job_and_usr1_requeue(cluster, tmp_path, tiny_model, pairs_file):
    extra = "dpo: {train: {lr: 0.002, max_steps: 30, global_batch_size: 8}}"
    first = write_recipe(tmp_path / "a.yaml", tiny_model, pairs_file, tmp_path / "a", extra)
    job = submit(first, pairs_file, tiny_model, tmp_path / "logs")
    st = wait_for(job)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*")) if p.is_file())
    assert st["JobState"] == "COMPLETED", f"{st}\n{logs[-4000:]}"
    manifest = json.loads((tmp_path / "a" / "dpo" / "manifest.json").read_text())
    assert manifest["world"] == 2 and manifest["zero_stage"] == 3 and manifest["steps"] == 30
    assert len((tmp_path / "a" / "dpo" / "metrics.jsonl").read_text().splitlines()) == 30
    per_node = sorted(p.name.rsplit("-", 1)[-1] for p in (tmp_path / "logs").glob("allo-dpo-*-node*.out"))
    assert per_node == ["node0.out", "node1.out"], per_node
    import shutil  # gloo's interface: the one each node routes the rendezvous address (127.0.0.1) through

    assert logs.count("GLOO_SOCKET_IFNAME=lo") == 2 or shutil.which("ip") is None, logs[-2000:]

    second = write_recipe(tmp_path / "b.yaml", tiny_model, pairs_file, tmp_path / "b", extra)
    job = submit(second, pairs_file, tiny_model, tmp_path / "logs2")
    metrics = tmp_path / "b" / "dpo" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline, f"job {job} never started training: {job_state(job)}"
        time.sleep(0.1)
    sh("scancel", "--signal=USR1", job)  # what --signal=USR1@120 sends before the time limit
    st = wait_for(job, timeout=500)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs2").glob("*")) if p.is_file())
    assert st["JobState"] == "COMPLETED" and int(st["Restarts"]) == 1, f"{st}\n{logs[-4000:]}"
    assert "requeueing" in logs
    a = load_file(str(tmp_path / "a" / "dpo" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "dpo" / "model" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a), "the requeued job did not end with the same weights"


def test_eval_suite_job_one_task_per_model_and_resume(cluster, tmp_path, tiny_model, shared_dir):
    """eval/eval.sbatch with 2 tasks (no GPUs here: --gpus-per-task=0): each task generates for its own model, the
    batch host writes the tables from what they wrote; the same job again generates nothing."""
    from tiny import make_model_dir

    other = make_model_dir(tmp_path / "other", seed=1)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: math\nbenchmarks: [gsm8k={shared_dir}/benchdata/gsm8k/test.jsonl]\ntemplate: raw\n"
                     "max_new_tokens: 4\nlimit: 2\ngeneration: {batch_size: 2}\n")
    models = ["--model", f"sft={tiny_model}", "--model", f"other={other}"]
    for attempt in (1, 2):  # the second from outside the checkout, relative paths, the checkout's own .venv
        log = tmp_path / f"eval-{attempt}.out"
        if attempt == 1:
            cwd, script, out, env = ROOT, "eval/eval.sbatch", str(tmp_path / "out"), dict(ENV, ALLO_PYTHON=sys.executable)
        else:
            cwd, script, out, env = tmp_path, str(ROOT / "eval/eval.sbatch"), "out", dict(ENV)
            env.pop("ALLO_PYTHON", None)
        job = sh("sbatch", "--parsable", "--ntasks=2", "--gpus-per-task=0", f"--output={log}", script,
                 str(suite), "--out", out, *models, cwd=cwd, env=env)
        st = wait_for(job)
        text = log.read_text()
        assert st["JobState"] == "COMPLETED", f"{st}\n{text[-4000:]}"
        assert f"python {ROOT / '.venv/bin/python'} (.venv" in text or attempt == 1
        block = r'^\{\n  "suite": "math".*?^\}'
        tasks = [json.loads(re.search(block, "\n".join(line.split(": ", 1)[1] for line in text.splitlines()
                                                        if line.startswith(f"{t}: ")), re.M | re.S).group())
                 for t in (0, 1)]  # srun --label: each task's lines carry its id
        assert sorted(list(r["models"]) for r in tasks) == [["other"], ["sft"]], "one model per task"
        judged = json.loads(re.search(block, text, re.M | re.S).group())  # the batch host's, unlabelled
        assert list(judged["models"]) == ["sft", "other"] and "table2" in judged
        predictions = {p: p.read_text() for p in (tmp_path / "out" / "eval").glob("*/*.predictions.jsonl")}
        assert len(predictions) == 2
        if attempt == 1:
            first = predictions
        else:
            assert "2 of 2 predictions already in" in text and " / 2 generated" not in text
            assert predictions == first, "the second job generated again"
    accuracy = {label: {"gsm8k": json.loads((tmp_path / "out" / "eval" / label / "gsm8k.result.json").read_text())
                        ["accuracy"]} for label in ("sft", "other")}
    assert judged["table2"] == accuracy  # (tests/test_eval_suite.py: shards + judge equal one process)
