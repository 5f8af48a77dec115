"""Kill-and-resume: a 2-rank ZeRO-3 run stopped mid-epoch by SIGTERM and resumed ends bit-identical (fp32, CPU)
to an uninterrupted run; the stop writes a checkpoint, `preempted.json` and exits non-zero for requeue."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from allo.launch import torchrun_command
from conftest import ENV, ROOT, torchrun, write_recipe

pytestmark = pytest.mark.slow
STEPS = 40  # 32 pairs / global batch 4 = 8 steps per epoch: the run crosses epoch boundaries


def recipe(tmp_path, tiny_model, pairs_file, name):
    return write_recipe(tmp_path / f"{name}.yaml", tiny_model, pairs_file, tmp_path / name,
                        f"dpo: {{train: {{lr: 0.002, global_batch_size: 4, micro_batch_size: 1, max_steps: {STEPS},"
                        f" save_every: 0}}}}")


def sigterm_after_steps(args: list[str], metrics, steps: int = 3, env=None, nproc: int = 2) -> str:
    """Start `allo ARGS` on `nproc` ranks, SIGTERM torchrun once `metrics` logs `steps` steps; the run's output."""
    proc = subprocess.Popen(torchrun_command(args, nproc), cwd=ROOT, env=env or ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0, f"the run finished before SIGTERM arrived:\n{out[-2000:]}"
    return out


def test_sigterm_then_resume_is_bitwise_identical(tmp_path, tiny_model, pairs_file):
    check_sigterm_resume(tmp_path, tiny_model, pairs_file)


def check_sigterm_resume(tmp_path, tiny_model, pairs_file, env=None, nproc: int = 2) -> None:
    torchrun(["dpo", str(recipe(tmp_path, tiny_model, pairs_file, "straight"))], nproc=nproc, env=env)

    r = recipe(tmp_path, tiny_model, pairs_file, "stopped")
    metrics = tmp_path / "stopped" / "dpo" / "metrics.jsonl"
    out = sigterm_after_steps(["dpo", str(r)], metrics, env=env, nproc=nproc)
    marker = tmp_path / "stopped" / "dpo" / "preempted.json"
    assert marker.exists(), f"no preempted.json after SIGTERM:\n{out[-4000:]}"
    stopped_at = json.loads(marker.read_text())["step"]
    assert 3 <= stopped_at < STEPS
    latest = (tmp_path / "stopped" / "dpo" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at:07d}"

    torchrun(["dpo", str(r)], nproc=nproc, env=env)  # resumes from `latest`
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, STEPS + 1)), "every step is logged exactly once across the two runs"
    a = load_file(str(tmp_path / "straight" / "dpo" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "dpo" / "model" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"


def test_checkpoint_rotation_keeps_last(tmp_path, tiny_model, pairs_file):
    r = recipe(tmp_path, tiny_model, pairs_file, "rot")
    args = ["dpo", str(r), "--set", "dpo.train.save_every=3", "--set", "dpo.train.max_steps=10",
            "--set", "train.keep_last=2"]
    torchrun(args[:2] + ["--set", "dpo.train.max_steps=4"])  # an earlier, shorter run in the same directory
    import shutil

    shutil.rmtree(tmp_path / "rot" / "dpo" / "checkpoints", ignore_errors=True)  # the next run starts fresh
    torchrun(args)
    steps = [json.loads(x)["step"] for x in (tmp_path / "rot" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11)), "a fresh run replaces the metrics of an earlier one"
    ckpts = sorted(p.name for p in (tmp_path / "rot" / "dpo" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000006", "step_0000009"]


def test_time_based_checkpoints_log_their_write_time(tmp_path, tiny_model, pairs_file):
    """`save_every_minutes` checkpoints by the clock (agreed by every rank) and the metrics say how long each write
    took, the number the Slurm signal lead time must exceed."""
    r = write_recipe(tmp_path / "t.yaml", tiny_model, pairs_file, tmp_path / "timed",
                     "dpo: {train: {lr: 0.002, global_batch_size: 4, micro_batch_size: 1, max_steps: 4,"
                     " save_every_minutes: 0.0001, keep_last: 5}}")
    torchrun(["dpo", str(r)])
    ckpts = sorted(p.name for p in (tmp_path / "timed" / "dpo" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000001", "step_0000002", "step_0000003"]  # every step but the last (the export)
    rows = [json.loads(x) for x in (tmp_path / "timed" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [("ckpt_write_s" in row) for row in rows] == [False, True, True, True]
    assert all(0 < row["ckpt_write_s"] < 60 for row in rows[1:])


def test_run_one_node_exits_75_on_preemption(tmp_path, tiny_model, pairs_file):
    """A pipeline training step preempted and resumed, through recipes/run_one_node.sh (torchrun, no Slurm): SIGUSR1
    to the script mid-step makes the step checkpoint and stop without a complete manifest, the script exit 75
    (torchrun alone would say 1); the same command again resumes the step from its checkpoint (every step logged
    once), completes it and exits 0. Every tracker (offline) holds each step once too: the resumed attempt continues
    the stage's wandb run and Trackio run."""
    from test_tracking import trackio_logs, wandb_history

    r = write_recipe(tmp_path / "run.yaml", tiny_model, pairs_file, tmp_path / "run",
                     f"task: {{pairs: {pairs_file}, family: instruct}}\n"
                     f"train: {{report_to: [tensorboard, wandb, trackio], tracker_project: resume-test}}\n"
                     f"warmup: {{train: {{lr: 0.002, global_batch_size: 4, micro_batch_size: 1, max_steps: {STEPS}}}}}")
    cmd = ["bash", "recipes/run_one_node.sh", str(r), "--only", "warmup"]
    env = dict(ENV, ALLO_GPUS="2", ALLO_PYTHON=str(ROOT / ".venv" / "bin" / "python"), WANDB_MODE="offline",
               WANDB_SILENT="true", TRACKIO_DIR=str(tmp_path / "trackio"))
    torchrun(["run", str(r), "--only", "pairs"], env=env)
    metrics = tmp_path / "run" / "warmup" / "metrics.jsonl"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 75, out[-4000:]
    assert "preempted after a checkpoint: exit 75" in out
    assert (tmp_path / "run" / "warmup" / "preempted.json").exists(), out[-4000:]
    manifest = tmp_path / "run" / "warmup" / "manifest.json"
    assert not manifest.exists() or not json.loads(manifest.read_text()).get("fingerprint")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert json.loads(manifest.read_text())["complete"] and json.loads(manifest.read_text())["fingerprint"]
    losses = [(row["step"], row["loss"]) for row in rows]
    run, history = wandb_history(tmp_path / "run" / "warmup" / "wandb")
    assert (run["group"], run["name"], run["project"]) == (str(tmp_path / "run"), "warmup", "resume-test")
    assert [(h["_step"], h["loss"]) for h in history] == losses
    import os

    os.environ["TRACKIO_DIR"] = env["TRACKIO_DIR"]
    try:
        assert [(h["step"], h["loss"]) for h in trackio_logs("resume-test", f"{tmp_path / 'run'}/warmup")] == losses
    finally:
        del os.environ["TRACKIO_DIR"]


def test_resuming_under_another_engine_says_which_two(tmp_path, tiny_model, pairs_file):
    """A one-rank checkpoint written under ZeRO-3 as configured, resumed by the one-GPU engine (ZeRO-0): one
    sentence naming both engines and the fix, before DeepSpeed tries to load it."""
    r = recipe(tmp_path, tiny_model, pairs_file, "engines")
    torchrun(["dpo", str(r), "--set", "dpo.train.save_every=2", "--set", "dpo.train.max_steps=4", "--set",
              "train.single_rank=as_configured"], nproc=1)
    proc = torchrun(["dpo", str(r), "--set", "dpo.train.max_steps=6"], nproc=1, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "written by another engine (ZeRO-3, 1 rank) than this run's (ZeRO-0, 1 rank)" in proc.stderr
    assert "delete" in proc.stderr and "train.single_rank" in proc.stderr
