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


def test_refuses_impossible_combinations(capsys):
    with pytest.raises(LaunchError, match=r"global_batch_size 32 is not a multiple of micro_batch_size 8 × world "
                                          r"size 3 = 24"):
        batch_arithmetic(32, 8, 3)
    assert main([TINY, "--nodes", "3", "--gpus-per-node", "1"]) == 2
    assert "not a multiple" in capsys.readouterr().err
    assert main([TINY, "--nodes", "0", "--gpus-per-node", "1"]) == 2
    assert main([TINY, "--nodes", "2", "--gpus-per-node", "1", "--stage", "dpo"]) == 0
    assert "dpo      global batch 32 = micro 8 × accumulation 2 × world 2" in capsys.readouterr().out
    # the micro batch shrinks to the largest size that still splits the global batch: 32 over 8 ranks -> micro 4
    assert main([TINY, "--nodes", "1", "--gpus-per-node", "8", "--stage", "dpo"]) == 0
    assert "dpo      global batch 32 = micro 4 × accumulation 1 × world 8" in capsys.readouterr().out
    assert main([TINY, "--nodes", "1", "--gpus-per-node", "8", "--stage", "nonsense"]) == 2
    assert "unknown stage 'nonsense'" in capsys.readouterr().err


def test_submit_prints_the_memory_plan_and_refuses_what_does_not_fit(tmp_path, tiny_model, pairs_file):
    """slurm/submit.sh --dry-run: the plan's verdict line; a plan that does not fit is refused (exit 2) unless
    --force; the --set overrides given for allo reach the plan."""
    import subprocess

    from conftest import ENV, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "out")
    env = dict(ENV, ALLO_PYTHON=str(ROOT / ".venv" / "bin" / "python"))

    def submit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "slurm/submit.sh", str(recipe), "--stage", "dpo", "--nodes", "2",
                               "--gpus-per-node", "1", "--dry-run", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)

    small = submit("--gpu-memory", "1GiB")
    assert small.returncode == 2 and "memory plan: does not fit: dpo exceeds 1 GiB per GPU" in small.stdout
    assert "refused: the plan does not fit" in small.stderr and "command:" not in small.stdout
    forced = submit("--gpu-memory", "1GiB", "--force")
    assert forced.returncode == 0 and "command: ALLO_ARGS='dpo " in forced.stdout
    ok = submit("--", "--set", "data.max_length=512")
    assert ok.returncode == 0 and "memory plan: fits: every step within 80 GiB per GPU" in ok.stdout
    longer = submit("--gpu-memory", "3GiB", "--", "--set", "train.micro_batch_size=256", "--set",
                    "dpo.train.global_batch_size=512", "--set", "data.max_length=1024")
    assert longer.returncode == 2 and "fix: --set dpo.train.micro_batch_size=" in longer.stdout, longer.stdout
