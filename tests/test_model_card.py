"""Every exported model directory carries a hub model card built from its manifest (issue 20)."""
from __future__ import annotations

import json

import yaml

from allo.pipeline import write_manifest


def test_card_from_manifest_and_metrics(tmp_path, monkeypatch) -> None:
    step_dir = tmp_path / "improve"
    (step_dir / "model").mkdir(parents=True)
    (step_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n" + json.dumps(
        {"step": 2, "loss": 0.6, "rewards/accuracy": 0.75, "rejected_kept_fraction": 0.1}) + "\n")
    monkeypatch.setattr("sys.argv", ["allo", "run", "recipes/qa/recipe.yaml", "--set", "seed=1"])
    manifest = {"stage": "improve", "init": "runs/qa/forget/model", "data": "runs/qa/pairs/pairs.jsonl",
                "mask": "runs/qa/locate/n2.safetensors", "model": str(step_dir / "model"), "steps": 2,
                "examples": 64, "world": 16, "zero_stage": 3, "trainable_fraction": 0.1, "wall_s": 12.5}
    write_manifest(step_dir, "improve", manifest, "abc")
    text = (step_dir / "model" / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {"library_name": "transformers", "base_model": "runs/qa/forget/model",
                     "datasets": ["runs/qa/pairs/pairs.jsonl"], "tags": ["allo", "improve", "improve", "alignment"]}
    assert "| trainable fraction | 0.1000 |" in text and "| last logged rewards/accuracy | 0.7500 |" in text
    assert "| neuron mask | `runs/qa/locate/n2.safetensors` |" in text and "| ranks / ZeRO stage | 16 / 3 |" in text
    assert "allo run recipes/qa/recipe.yaml --set seed=1" in text
    assert json.loads((step_dir / "manifest.json").read_text())["complete"]


def test_no_card_without_a_model(tmp_path) -> None:
    write_manifest(tmp_path, "pairs", {"pairs": 3})
    assert not (tmp_path / "model").exists() and (tmp_path / "manifest.json").exists()
