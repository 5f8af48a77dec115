"""`allo report RUN_DIR`: PNG plots of a run directory (whatever stages it holds).

- curves.png: loss and reward margin per optimizer step for every stage with a metrics.jsonl;
- masks.png: selected fraction of N1 and N2 per layer (from locate's JSON sidecars and mask shapes);
- token_rewards.png: histogram of the reward model's keep-probabilities over the wrong responses' tokens.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

STAGE_ORDER = ("sft", "warmup", "reward-train", "forget", "improve", "dpo", "npo")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_curves(run: Path, out: Path) -> Path | None:
    stages = [s for s in STAGE_ORDER if (run / s / "metrics.jsonl").exists()]
    if not stages:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(stages), figsize=(3.2 * len(stages), 5.2), squeeze=False)
    for col, stage in enumerate(stages):
        rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
        steps = [r["step"] for r in rows]
        axes[0][col].plot(steps, [r["loss"] for r in rows])
        axes[0][col].set_title(stage)
        if "rewards/margin" in rows[0]:
            axes[1][col].plot(steps, [r["rewards/margin"] for r in rows], color="tab:green")
            axes[1][col].set_xlabel("step")
        else:
            axes[1][col].axis("off")
    axes[0][0].set_ylabel("loss")
    axes[1][0].set_ylabel("reward margin")
    return _save(fig, out / "curves.png")


def layer_fractions(mask_file: Path) -> dict[str, float]:
    """Selected fraction per layer ("embed/head/norm" outside layers) from the sidecar counts."""
    from allo.masks.io import mask_counts, mask_shapes

    counts, shapes = mask_counts(mask_file), mask_shapes(mask_file)
    sel, tot = defaultdict(int), defaultdict(int)
    for name, shape in shapes.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        key = f"L{int(m.group(1)):02d}" if m else "other"
        sel[key] += counts[name]
        tot[key] += math.prod(shape)
    return {k: sel[k] / tot[k] for k in sorted(tot)}


def plot_masks(run: Path, out: Path) -> Path | None:
    files = sorted((run / "locate").glob("*.safetensors"))
    if not files:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for f in files:
        fr = layer_fractions(f)
        ax.plot(list(fr), [100 * v for v in fr.values()], marker="o", label=f.stem)
    ax.set_ylabel("% of elements selected")
    ax.set_title("neuron masks per layer")
    ax.legend()
    return _save(fig, out / "masks.png")


def plot_token_rewards(run: Path, out: Path) -> Path | None:
    path = run / "reward-score" / "forget.jsonl"
    if not path.exists():
        return None
    probs = [p for line in path.read_text().splitlines() if line.strip() for p in json.loads(line)["keep_probs"]]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(probs, bins=50, log=True)
    ax.axvline(0.5, color="tab:red", linestyle="--", label="p = 0.5 (indicator threshold)")
    ax.set_xlabel("keep-probability p_ij of a wrong response's token")
    ax.set_ylabel("tokens (log)")
    ax.legend()
    return _save(fig, out / "token_rewards.png")


def report(run_dir: str | Path) -> list[Path]:
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory")
    out = run / "report"
    out.mkdir(exist_ok=True)
    made = [p for p in (plot_curves(run, out), plot_masks(run, out), plot_token_rewards(run, out)) if p]
    return made
