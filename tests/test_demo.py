"""The reduced demo (`recipes/tiny/demo.py --quick`, one seed): every stage runs and writes its outputs.
Accuracies are not checked: they are whatever the tiny run measures."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, ROOT

pytestmark = pytest.mark.slow


def test_quick_demo_runs_every_stage(tmp_path):
    run = ROOT / "runs" / "tiny" / "seed7"
    proc = subprocess.run([sys.executable, "recipes/tiny/demo.py", "--quick", "--seeds", "7"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("sft", "warmup", "reward-train", "forget", "improve", "dpo", "npo"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["complete"] and (run / stage / "model" / "model.safetensors").exists(), stage
        assert (run / stage / "metrics.jsonl").exists()
    for m in ("n1", "n2"):
        assert (run / "locate" / f"{m}.safetensors").exists()
    # the ALLO stages moved only their masks: forget vs its input (SFT), improve vs its input (forget)
    from allo.masks.io import load_masks

    for stage, init, mask in (("forget", "sft", "n1"), ("improve", "forget", "n2")):
        before = load_file(str(run / init / "model" / "model.safetensors"))
        after = load_file(str(run / stage / "model" / "model.safetensors"))
        keep = load_masks(run / "locate" / f"{mask}.safetensors")
        for name, m in keep.items():
            assert torch.equal(before[name][~m], after[name][~m]), f"{stage}: {name} moved outside {mask}"
    from allo.pipeline import STEPS

    assert all(json.loads((run / s / "manifest.json").read_text())["complete"] for s in STEPS)
    forget = [json.loads(x) for x in (run / "reward-score" / "forget.jsonl").read_text().splitlines()]
    assert forget and all(0.0 <= p <= 1.0 for rec in forget for p in rec["keep_probs"])
    result = json.loads((run / "demo_result.json").read_text())
    assert set(result["accuracy"]) == {"SFT", "+DPO", "+NPO", "+ALLO"}
    assert "| +ALLO |" in proc.stdout
    for png in ("curves.png", "masks.png", "token_rewards.png"):
        assert (run / "report" / png).stat().st_size > 1000, png
