"""The launcher's batch arithmetic and its refusal of impossible combinations."""
from __future__ import annotations

import pytest

from allo.engine import LaunchError, batch_arithmetic
from allo.launch import main, plan
from conftest import ROOT

TINY = str(ROOT / "recipes" / "tiny" / "recipe.yaml")


def test_arithmetic_holds_for_every_stage():
    for nodes, gpus in ((1, 1), (2, 1), (1, 2), (2, 2), (4, 2)):
        for row in plan(TINY, nodes, gpus):
            assert row["micro"] * row["accumulation"] * row["world"] == row["global"], row


def test_refuses_impossible_combinations(capsys, tmp_path, tiny_model, pairs_file):
    from conftest import write_recipe

    with pytest.raises(LaunchError, match=r"global_batch_size 32 is not a multiple of micro_batch_size 8 × world "
                                          r"size 3 = 24"):
        batch_arithmetic(32, 8, 3)
    recipe = str(write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "out",
                              "dpo: {train: {global_batch_size: 32, micro_batch_size: 8}}"))
    assert main([recipe, "--nodes", "3", "--gpus-per-node", "1", "--stage", "dpo"]) == 2
    assert "step dpo: dpo.train.global_batch_size = 32 is not a multiple of the world size 3" in capsys.readouterr().err
    assert main([recipe, "--nodes", "0", "--gpus-per-node", "1"]) == 2
    assert main([recipe, "--nodes", "2", "--gpus-per-node", "1", "--stage", "dpo"]) == 0
    assert "dpo      global batch 32 = micro 8 × accumulation 2 × world 2" in capsys.readouterr().out
    # the micro batch shrinks to the largest size that still splits the global batch: 32 over 8 ranks -> micro 4
    assert main([recipe, "--nodes", "1", "--gpus-per-node", "8", "--stage", "dpo"]) == 0
    assert "dpo      global batch 32 = micro 4 × accumulation 1 × world 8" in capsys.readouterr().out
    assert main([recipe, "--nodes", "1", "--gpus-per-node", "8", "--stage", "nonsense"]) == 2
    assert "not a valid allo command" in capsys.readouterr().err


def test_every_problem_at_once_with_the_set_values(capsys, tmp_path, tiny_model, pairs_file, monkeypatch):
    """The pipeline's pre-flight at the job's world size, --set values included: a missing SFT file, a hosted
    teacher without its key, a judge without its key, a chat template the tokenizer lacks and a global batch the
    world cannot split, all in one answer (exit 2), before anything is queued."""
    from conftest import write_recipe

    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    recipe = str(write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "out", f"""
task: {{sft_data: {tmp_path}/missing.jsonl, problems: {pairs_file}, alpaca_eval: {pairs_file},
       judge: {{base_url: "https://judge.example/v1", model: j, api_key_env: NO_SUCH_KEY}}}}
reward: {{teacher: openai, teacher_endpoint: {{base_url: "https://api.example/v1", model: t,
                                               api_key_env: NO_SUCH_KEY}}}}
"""))
    assert main([recipe, "--nodes", "2", "--gpus-per-node", "4", "--", "--set", "data.template=chat",
                 "--set", "improve.train.global_batch_size=100"]) == 2
    err = capsys.readouterr().err
    assert "5 problems, each with its fix" in err, err
    for said in ("missing.jsonl: no such data file (check the path) (recipe key task.sft_data)",
                 "reward.teacher_endpoint: the API key variable NO_SUCH_KEY is not set",
                 "task.judge: the API key variable NO_SUCH_KEY is not set",
                 "data.template is 'chat' but this tokenizer (model.path) has no chat template",
                 "step improve: improve.train.global_batch_size = 100 is not a multiple of the world size 8 (each "
                 "rank takes equal micro batches); set --set improve.train.global_batch_size=104 or 96"):
        assert said in err, said


def test_a_gpu_job_refuses_a_cpu_torch(capsys, tmp_path, tiny_model, pairs_file):
    import torch

    from conftest import write_recipe

    recipe = str(write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "out"))
    rc = main([recipe, "--nodes", "1", "--gpus-per-node", "1", "--stage", "dpo", "--gpu"])
    if torch.version.cuda:
        assert rc == 0
    else:
        assert rc == 2 and "is a CPU build; a GPU job needs a CUDA build" in capsys.readouterr().err


def test_a_gpu_job_with_packing_needs_flash_attention(capsys, tmp_path, tiny_model, pairs_file):
    """Packing with sdpa on GPUs is refused when the job is submitted, naming the step and the key that set it;
    the same job on the CPU, or with flash attention, is not refused for it."""
    from conftest import write_recipe

    recipe = str(write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "out"))
    base = [recipe, "--nodes", "1", "--gpus-per-node", "1", "--stage", "dpo"]
    main([*base, "--gpu", "--", "--set", "dpo.train.packing=true"])
    err = capsys.readouterr().err
    assert "dpo (dpo.train.packing): train.packing with model.attn_implementation sdpa on a GPU" in err
    assert main([*base, "--", "--set", "dpo.train.packing=true"]) == 0
    main([*base, "--gpu", "--", "--set", "dpo.train.packing=true", "--set",
          "model.attn_implementation=flash_attention_2"])
    assert "train.packing with model.attn_implementation" not in capsys.readouterr().err


def test_submit_prints_the_memory_plan_and_refuses_what_does_not_fit(tmp_path, tiny_model, pairs_file):
    """slurm/submit.sh --dry-run: the plan's verdict line; a plan that does not fit is refused (exit 2) unless
    --force; the --set overrides given for allo reach the plan. A GPU job needs a CUDA torch: on a CPU-only torch it
    is refused after the plan has been printed too (one answer with everything)."""
    import subprocess

    import torch

    from conftest import ENV, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "out")
    env = dict(ENV, ALLO_PYTHON=str(ROOT / ".venv" / "bin" / "python"))
    cpu_torch = not torch.version.cuda

    def submit(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", "slurm/submit.sh", str(recipe), "--stage", "dpo", "--nodes", "2",
                               "--gpus-per-node", "1", "--dry-run", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert ("is a CPU build; a GPU job needs a CUDA build" in proc.stderr) == cpu_torch
        return proc

    small = submit("--gpu-memory", "1GiB")
    assert small.returncode == 2 and "memory plan: does not fit: dpo exceeds 1 GiB per GPU" in small.stdout
    assert "refused: the plan does not fit" in small.stderr and "command:" not in small.stdout
    forced = submit("--gpu-memory", "1GiB", "--force")
    assert forced.returncode == (2 if cpu_torch else 0)
    assert ("command: " in forced.stdout) != cpu_torch
    ok = submit("--", "--set", "data.max_length=512")
    assert "memory plan: fits: every step within 80 GiB per GPU" in ok.stdout
    longer = submit("--gpu-memory", "3GiB", "--", "--set", "train.micro_batch_size=256", "--set",
                    "dpo.train.global_batch_size=512", "--set", "data.max_length=1024")
    assert longer.returncode == 2 and "fix: --set dpo.train.micro_batch_size=" in longer.stdout, longer.stdout
