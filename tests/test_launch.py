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
