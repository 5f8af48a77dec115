"""bench/gpu.py end to end on CPU (--smoke): the script a GPU session runs must not be broken when it gets there."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

pytestmark = pytest.mark.slow


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
