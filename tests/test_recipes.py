"""The paper recipes: they validate, their batch arithmetic holds on the usual GPU counts, run.sh prints the plan and
the torchrun command, and prepare_data.py turns the real training files into SFT records and problems whose
references check against their own answers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from allo.config import load_recipe
from allo.launch import plan
from allo.tasks import is_correct
from conftest import ENV, ROOT

PAPER = ("qa", "math", "instruct")


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_validates_and_splits_on_common_gpu_counts(name):
    recipe = load_recipe(ROOT / "recipes" / name / "recipe.yaml")
    assert recipe.stage_train("warmup").lr == 1e-6 and recipe.stage_train("improve").global_batch_size == 128
    assert recipe.stage_train("forget").lr == 5e-7 and recipe.stage_train("reward").epochs == 3
    for nodes, gpus in ((1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8)):
        for row in plan(str(ROOT / "recipes" / name / "recipe.yaml"), nodes, gpus):
            assert row["micro"] * row["accumulation"] * row["world"] == row["global"], (name, nodes, row)


@pytest.mark.parametrize("name", PAPER)
def test_run_sh_prints_plan_and_command(name, tmp_path):
    """With its inputs in place (tests/paper_toy.py: a toy model, data and a loopback endpoint), a paper recipe's
    dry run passes the pre-flight and prints the arithmetic and the command; on 3 GPUs its batches cannot split."""
    from conftest import SHARED
    from paper_toy import overrides

    sets = [x for v in overrides(name, tmp_path, SHARED if SHARED.exists() else None, "http://127.0.0.1:9/v1")
            + [f"output_dir={tmp_path / 'run'}"] for x in ("--set", v)]
    proc = subprocess.run([str(ROOT / "recipes" / name / "run.sh"), "--dry-run", "--from", "warmup", *sets],
                          cwd=ROOT, env=dict(ENV, ALLO_GPUS="8"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "world size: 1 nodes × 8 processes = 8" in proc.stdout
    command = proc.stdout.split("command: ")[1]
    assert "--nproc_per_node 8 -m allo run" in command and f"{name}/recipe.yaml --from warmup" in command
    bad = subprocess.run([str(ROOT / "recipes" / name / "run.sh"), "--dry-run", *sets], cwd=ROOT,
                         env=dict(ENV, ALLO_GPUS="3"), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.global_batch_size = 8 is not a multiple of the world size 3" in bad.stderr


def test_prepare_data_from_real_training_files(shared_dir, tmp_path):
    bench = shared_dir / "benchdata"
    for family, sources, check in (
            ("qa", [f"ecqa={bench}/ecqa/rlmec_train_first500.jsonl", f"qasc={bench}/qasc/rlmec_train_first500.jsonl",
                    f"openbookqa={bench}/openbookqa/rlmec_train_first500.jsonl",
                    f"strategyqa={bench}/strategyqa/train_90pct.json"], "qa"),
            ("math", [f"gsm8k={bench}/gsm8k/train_first500.jsonl"], "math")):
        out = tmp_path / family
        args = [sys.executable, "recipes/prepare_data.py", family, "--out", str(out)]
        for s in sources:
            args += ["--source", s]
        proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        counts = json.loads(proc.stdout)
        problems = [json.loads(x) for x in (out / "problems.jsonl").read_text().split("\n") if x]
        assert len(problems) == counts["records"] == {"qa": 500 * 3 + 2061, "math": 500}[family]
        assert all(is_correct(p["reference"], p["answer"], check) for p in problems)
        sft = [json.loads(x) for x in (out / "sft.jsonl").read_text().split("\n") if x]
        assert [s["response"] for s in sft] == [p["reference"] for p in problems]
        assert "<<" not in "".join(s["response"] for s in sft)
        recipe = load_recipe(ROOT / "recipes" / family / "recipe.yaml",
                             [f"task.sft_data={out / 'sft.jsonl'}", f"task.problems={out / 'problems.jsonl'}"])
        assert recipe.task.family == family
