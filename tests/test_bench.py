"""bench/gpu.py end to end on CPU (--smoke): the script a GPU session runs must not be broken when it gets there;
and bench/profile_share.py's reading of a raw py-spy profile."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

sys.path.insert(0, str(ROOT / "bench"))
import profile_share  # noqa: E402


@pytest.mark.slow
def test_gpu_bench_smoke(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for run in ("dpo", "allo_dense", "allo_sparse"):
        assert res[run]["tokens_per_s"] > 0 and 0 < res[run]["mfu"] < 1 and res[run]["peak_mem_mb"] > 0
    assert res["allo_sparse"]["optim_state_mb"] < res["allo_dense"]["optim_state_mb"]
    assert "| allo_sparse |" in proc.stdout


def test_profile_share_counts_train_loop_samples():
    train = "process 1:\"python\";<module> (allo/cli.py:9);train (allo/train.py:207)"
    lines = [f"{train};before_step (allo/masks/apply.py:140);masked_fill (torch) 3\n",
             f"{train};step (deepspeed/runtime/zero/stage3.py:2100);step (allo/optim.py:94) 5\n",
             f"{train};step (allo/optim.py:61);step (allo/optim.py:87) 2\n",
             f"{train};forward (transformers/models/llama.py:300) 40\n",
             "process 1:\"python\";<module> (allo/cli.py:9);load (allo/model.py:3) 99\n"]  # outside the loop
    total, counts = profile_share.shares(lines)
    assert total == 50
    assert counts == {"GradMasker.before_step": 3, "MaskedAdamW.step": 7, "allo/optim.py:94": 5, "allo/optim.py:87": 2}
