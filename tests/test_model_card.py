"""Every exported model directory carries a hub model card built from its manifest (issue 20)."""
from __future__ import annotations

import json

import yaml

from allo.manifests import write_manifest


def test_card_from_manifest_and_metrics(tmp_path, monkeypatch) -> None:
    step_dir = tmp_path / "improve"
    (step_dir / "model").mkdir(parents=True)
    (step_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.7}) + "\n" + json.dumps(
        {"step": 2, "loss": 0.6, "rewards/accuracy": 0.75, "rejected_kept_fraction": 0.1}) + "\n")
    monkeypatch.setattr("sys.argv", ["allo", "run", "recipes/qa/recipe.yaml", "--set", "seed=1"])
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    manifest = {"stage": "improve", "init": "runs/qa/forget/model", "data": "runs/qa/pairs/pairs.jsonl",
                "mask": "runs/qa/locate/n2.safetensors", "model": str(step_dir / "model"), "steps": 2,
                "examples": 64, "world": 16, "zero_stage": 3, "trainable_fraction": 0.1, "wall_s": 12.5}
    write_manifest(step_dir, "improve", manifest, "abc")
    text = (step_dir / "model" / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    # local paths are no hub ids: they stay out of the front matter (and in the table); tags once each
    assert front == {"library_name": "transformers", "tags": ["allo", "improve", "alignment"]}
    assert "| starting weights | `runs/qa/forget/model` |" in text
    assert "| trainable fraction | 0.1000 |" in text and "| last logged rewards/accuracy | 0.7500 |" in text
    assert "| neuron mask | `runs/qa/locate/n2.safetensors` |" in text and "| ranks / ZeRO stage | 16 / 3 |" in text
    assert "allo run recipes/qa/recipe.yaml --set seed=1" in text
    assert json.loads((step_dir / "manifest.json").read_text())["complete"]


def test_no_card_without_a_model(tmp_path) -> None:
    write_manifest(tmp_path, "pairs", {"pairs": 3})
    assert not (tmp_path / "model").exists() and (tmp_path / "manifest.json").exists()


def test_card_names_hub_ids_and_the_launcher(tmp_path, monkeypatch) -> None:
    step_dir = tmp_path / "warmup"
    (step_dir / "model").mkdir(parents=True)
    monkeypatch.setattr("sys.argv", ["allo", "run", "recipes/math/recipe.yaml", "--set", "seed=1"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    manifest = {"stage": "dpo", "init": "meta-llama/Llama-2-7b-hf", "data": "openai/gsm8k",
                "model": str(step_dir / "model")}
    write_manifest(step_dir, "warmup", manifest, "abc")
    text = (step_dir / "model" / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model"] == "meta-llama/Llama-2-7b-hf" and front["datasets"] == ["openai/gsm8k"]
    assert front["tags"] == ["allo", "warmup", "dpo", "alignment"]
    assert "python -m allo.torchrun --nproc_per_node 8 --nnodes 2 -m allo run recipes/math/recipe.yaml --set seed=1" \
        in text
