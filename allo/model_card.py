"""A model card (README.md with the hub's YAML front matter) in every exported model directory, built from the
step's manifest, its last logged metrics and the command that ran, so `hf upload` publishes the
directory as it is."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from allo.io import atomic_write_text

METRICS = ("loss", "rewards/accuracy", "rewards/margin", "weighted_token_fraction", "rejected_kept_fraction",
           "nll/chosen")


def card(step: str, manifest: dict, step_dir: Path) -> str:
    """The README.md text for the model of `step` (its manifest's fields, its metrics.jsonl's last line)."""
    from allo.launch import launched_as
    from allo.steps import REGISTRY

    last = _last_metrics(step_dir / "metrics.jsonl")
    front: dict = {"library_name": "transformers"}
    if _hub_id(manifest.get("init")):  # local paths mean nothing on the hub: they stay in the table below
        front["base_model"] = manifest["init"]
    if _hub_id(manifest.get("data")):
        front["datasets"] = [manifest["data"]]
    front["tags"] = list(dict.fromkeys(["allo", step, manifest.get("stage", step), "alignment"]))

    rows = [("step", f"`{step}`: {REGISTRY[step].help}" if step in REGISTRY else f"`{step}`"),
            ("starting weights", f"`{manifest.get('init')}`"), ("data", f"`{manifest.get('data')}`"),
            ("neuron mask", f"`{manifest['mask']}`" if manifest.get("mask") else "none (every parameter trains)"),
            ("trainable fraction", f"{manifest.get('trainable_fraction', 1.0):.4f}"),
            ("optimizer steps / records", f"{manifest.get('steps')} / {manifest.get('examples')}"),
            ("ranks / ZeRO stage", f"{manifest.get('world')} / {manifest.get('zero_stage')}"),
            ("wall time", f"{manifest.get('wall_s')} s")]
    rows += [(f"last logged {k}", f"{last[k]:.4f}") for k in METRICS if isinstance(last.get(k), (int, float))]
    command = launched_as(sys.argv[1:])
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n# {step} model, trained with allo\n\n"
            f"ALLO (Chen et al., arXiv 2406.12606) recipes on DeepSpeed. The settings this model was trained with "
            f"are in `../config.yaml`; its per-step metrics in `../metrics.jsonl`.\n\n| field | value |\n|---|---|\n"
            f"{body}\n\nMade by:\n\n```bash\n{command}\n```\n")


def write_card(step: str, manifest: dict, step_dir: Path) -> None:
    model = Path(manifest["model"])
    if model.is_dir():
        atomic_write_text(model / "README.md", card(step, manifest, Path(step_dir)))


def _hub_id(value) -> bool:
    """`owner/name` of a hub repository (not a path on this machine)."""
    return isinstance(value, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None \
        and not Path(value).exists() and not value.startswith((".", "/"))


def _last_metrics(path: Path) -> dict:
    try:
        lines = path.read_text().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}
