"""`allo report RUN_DIR`: PNG plots of a run directory (whatever stages it holds).

- curves.png: loss and reward margin per optimizer step for every stage with a metrics.jsonl;
- masks.png: selected fraction of N1 and N2 per layer (from locate's JSON sidecars and mask shapes);
- token_rewards.png: histogram of the reward model's keep-probabilities over the wrong responses' tokens;
- tables.md: the paper's layouts. Table 2 (accuracy %, QA and math columns with their averages) from the result
  files `RUN/eval/<model>/<benchmark>.result.json` (what `allo run`'s eval step and `allo eval bench --out
  RUN/eval/<model>` write); Table 3 (win rate % against the SFT model) and held-out accuracy from
  `RUN/eval/results.json`.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from pathlib import Path

from allo.eval.suite import slug
from allo.io import read_jsonl
from allo.steps import TRAINING as STAGE_ORDER  # the training steps, in run order
from allo.steps import table_rows

log = logging.getLogger(__name__)


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
        rows = read_jsonl(run / stage / "metrics.jsonl")
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
    probs = [p for rec in read_jsonl(path) for p in rec["keep_probs"]]
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
    if not any(run.glob("*/manifest.json")) and not any(run.glob("eval/*/*.result.json")):
        runs = sorted(str(m.parent.parent) for m in run.glob("*/*/manifest.json"))
        hint = f"; runs inside it: {', '.join(dict.fromkeys(runs))}" if runs else \
            " (a run directory is a recipe's output_dir after `allo run`, e.g. runs/tiny/seed0)"
        raise FileNotFoundError(f"{run}: no run here, no STEP/manifest.json{hint}")
    out = run / "report"
    out.mkdir(exist_ok=True)
    made = [p for p in (plot_curves(run, out), plot_masks(run, out), plot_token_rewards(run, out)) if p]
    made += plot_ablations(run, out)
    text = tables(run)
    if text:
        (out / "tables.md").write_text(text + "\n")
        made.append(out / "tables.md")
    elif not made:
        raise FileNotFoundError(f"{run}: nothing to report yet: no eval results ({run / 'eval'}) and no training "
                                "metrics, masks or token rewards; run the steps first (`allo run RECIPE`)")
    else:
        log.warning("%s: no tables: the eval step has not written results there yet (`allo run RECIPE --only eval` "
                    "scores the models); the plots are made", run)
    return made


# Table 2 of the paper: column order and headers; benchmarks it does not have follow in their group.
PAPER_COLUMNS = {"qa": [("ecqa", "ECQA"), ("qasc", "QASC"), ("openbookqa", "OBQA"), ("strategyqa", "SQA")],
                 "math": [("gsm8k", "GSM8K"), ("math", "MATH"), ("mawps", "MAWPS"), ("tabmwp", "TabMWP")]}
ROW_LABEL = {"sft": "SFT LLM", **{slug(s.label): s.label for s in table_rows()}}  # result dirs are the label slugs
ROW_ORDER = tuple(ROW_LABEL)


def accuracies(run: Path) -> dict[str, dict[str, float]]:
    """{model's result directory: {benchmark: accuracy %}} from RUN/eval/<model>/<benchmark>.result.json."""
    acc: dict[str, dict[str, float]] = defaultdict(dict)
    for f in sorted((run / "eval").glob("*/*.result.json")):
        r = json.loads(f.read_text())
        acc[f.parent.name][r["benchmark"]] = r["accuracy"]
    return dict(acc)


def table2(run: Path) -> str | None:
    """Markdown in Table 2's layout from RUN/eval/<model>/<benchmark>.result.json."""
    from allo.eval.benchmarks import get

    acc = accuracies(run)
    if not acc:
        return None
    present = {b for row in acc.values() for b in row}
    groups = []
    for group, cols in PAPER_COLUMNS.items():
        extra = sorted(b for b in present if get(b).group == group and b not in dict(cols))
        names = [(b, h) for b, h in cols if b in present] + [(b, b.upper()) for b in extra]
        if names:
            groups.append((group, names))
    header = []
    for group, names in groups:
        header += [h for _, h in names] + [{"qa": "QA avg", "math": "Math avg"}[group]]
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    models = sorted(acc, key=lambda m: (ROW_ORDER.index(m) if m in ROW_ORDER else len(ROW_ORDER), m))
    for m in models:
        cells = []
        for _, names in groups:
            vals = [acc[m].get(b) for b, _ in names]
            cells += [f"{v:.2f}" if v is not None else "–" for v in vals]
            cells.append(f"{sum(vals) / len(vals):.2f}" if all(v is not None for v in vals) else "–")
        lines.append(f"| {ROW_LABEL.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(run: Path) -> str | None:
    parts = []
    results = run / "eval" / "results.json"
    res = json.loads(results.read_text()) if results.exists() else {}
    if res.get("accuracy"):
        parts.append("Held-out accuracy % (" + str(res.get("eval_data")) + ", greedy)\n\n| method | accuracy |\n|---|---|\n"
                     + "\n".join(f"| {m} | {100 * a:.1f} |" for m, a in res["accuracy"].items()))
    t2 = table2(run)
    if t2:
        parts.append("Table 2 layout: accuracy %\n\n" + t2)
    ab = ablation_table(run)
    if ab:
        parts.append("Ablations (`allo ablate`): ALLO's model under each control, accuracy %\n\n" + ab)
    if res.get("table3"):
        t3 = {m: v for m, v in res["table3"].items() if not m.startswith("_")}
        judge = res["table3"].get("_judge", {}).get("model")
        ci = res["table3"].get("_arena_hard_ci95", {})
        against = res["table3"].get("_baseline")
        against = f"{against}'s answers" if against else "the SFT model (both orders)"
        parts.append(f"Table 3 layout: win rate % against {against} (judge {judge}; Arena-Hard with "
                     "its bootstrap 95% interval)\n\n| method | AlpacaEval 2.0 | Arena-Hard |\n|---|---|---|\n" +
                     "\n".join(f"| {m} | {_cell(v.get('alpaca_eval'))} | {_cell(v.get('arena_hard'))}"
                               f"{_interval(ci.get(m))} |" for m, v in t3.items()))
    return "\n\n".join(parts) or None


def _cell(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def _interval(ci) -> str:
    return f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci and None not in ci else ""


# ------------------------------------------------------------------------------------------------ ablations
def ablation_rows(run: Path) -> list[dict]:
    """One row per variant under RUN/ablate (and the run's own ALLO first): its name, mask ratios and selection,
    held-out accuracy % and Table 2 accuracies, from each variant's eval results and mask sidecars."""
    def row(name: str, d: Path) -> dict | None:
        res = json.loads((d / "eval" / "results.json").read_text()) if (d / "eval" / "results.json").exists() else {}
        allo = next((k for k in res.get("accuracy", {}) if k == "+ALLO"), None)
        t2 = (res.get("table2") or {}).get("+ALLO", {})
        if allo is None and not t2:
            return None
        masks = {k: json.loads((d / "locate" / f"{k}.json").read_text()) for k in ("n1", "n2")
                 if (d / "locate" / f"{k}.json").exists()}
        return {"variant": name, "n1": masks.get("n1", {}).get("ratio"), "n2": masks.get("n2", {}).get("ratio"),
                "selection": masks.get("n2", {}).get("selection", "top"),
                "accuracy": 100 * res["accuracy"][allo] if allo else None, "table2": t2}

    def order(d: Path) -> tuple:  # the sweep by ratio (ratio-R, ratio-N1-N2), then the controls by name
        sweep = d.name.startswith("ratio-")
        return (not sweep, tuple(float(x) for x in d.name[6:].split("-")) if sweep else (), d.name)

    variants = sorted((d for d in (run / "ablate").glob("*") if (d / "ablation.json").exists()), key=order)
    rows = [r for r in [row("run", run)] + [row(d.name, d) for d in variants] if r]
    return rows if len(rows) > 1 else []


def ablation_table(run: Path) -> str | None:
    rows = ablation_rows(run)
    if not rows:
        return None
    benches = sorted({b for r in rows for b in r["table2"]})
    lines = ["| " + " | ".join(["variant", "N1 %", "N2 %", "mask", "held-out"] + benches) + " |",
             "|---" * (5 + len(benches)) + "|"]
    for r in rows:
        cells = [r["variant"], _num(r["n1"], "g"), _num(r["n2"], "g"), r["selection"], _num(r["accuracy"], ".1f")]
        lines.append("| " + " | ".join(cells + [_num(r["table2"].get(b), ".2f") for b in benches]) + " |")
    return "\n".join(lines)


def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def plot_ablations(run: Path, out: Path) -> list[Path]:
    """ablation_ratios.png: ALLO's accuracy against the mask ratio (the sweep, with the run's own ratio);
    ablation_controls.png: one bar per control beside the run's ALLO."""
    rows = [r for r in ablation_rows(run) if r["accuracy"] is not None]
    made = []
    sweep = sorted((r["n2"], r["accuracy"]) for r in rows if r["n1"] == r["n2"]
                   and (r["variant"].startswith("ratio-") or r["variant"] == "run"))
    if any(r["variant"].startswith("ratio-") for r in rows):
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([x for x, _ in sweep], [y for _, y in sweep], marker="o")
        ax.set_xlabel("mask ratio N1 = N2 (%)")
        ax.set_ylabel("held-out accuracy of ALLO (%)")
        made.append(_save(fig, out / "ablation_ratios.png"))
    controls = [r for r in rows if not r["variant"].startswith("ratio-")]
    if len(controls) > 1:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(1.2 * len(controls) + 2, 3.5))
        ax.bar([r["variant"] for r in controls], [r["accuracy"] for r in controls])
        ax.set_ylabel("held-out accuracy (%)")
        ax.tick_params(axis="x", rotation=30)
        made.append(_save(fig, out / "ablation_controls.png"))
    return made
