"""`allo ablate RECIPE`: the paper's controls over a finished run, one command each.

Each control is a variant run in OUTPUT_DIR/ablate/VARIANT whose recipe is the run's plus the variant's settings.
It reuses the run's SFT model, samples, pairs, warm-up, token reward model and baselines (its step directories
are symlinks to the run's) and redoes only what the variant changes: locate, forget, improve, and the eval of
ALLO's model (`task.eval_models`). The pipeline's fingerprints guarantee the reuse is exact: a linked step whose
settings differed would be rerun, so only steps the variant's settings cannot reach are linked.

- `--ratios R ...`: the mask-ratio sweep, N1 = N2 = R% (the paper's inverted U around 10-15%);
- `--without forget|improve|locate`: ALLO without a stage (`forget.enabled` / `improve.enabled` false: the step
  passes its starting model through), or without locate: a uniformly random mask of the same sizes;
- `--mask random|bottom`: the random-mask and bottom-k% controls at the run's ratios.
`allo report OUTPUT_DIR` puts them in a table and plots (report/ablation_ratios.png, report/ablation_controls.png).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from allo.config import Recipe, load_recipe

log = logging.getLogger(__name__)
REDONE = ("locate", "forget", "improve", "eval")  # what any variant's settings reach; every other step is linked
CONTROLS = {"without-forget": ["forget.enabled=false"], "without-improve": ["improve.enabled=false"],
            "mask-random": ["locate.random=true"], "mask-bottom": ["locate.bottom=true"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratios", type=float, nargs="+", metavar="R", help="mask-ratio sweep: N1 = N2 = R%% each")
    parser.add_argument("--without", nargs="+", choices=["forget", "improve", "locate"], default=[],
                        help="ALLO without a stage (without locate: a random mask of the same size)")
    parser.add_argument("--mask", nargs="+", choices=["random", "bottom"], default=[],
                        help="random-mask and bottom-k%% controls at the run's ratios")


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
    """Variant name -> its recipe overrides, in the order asked; without locate is the random-mask control."""
    out: dict[str, list[str]] = {}
    for r in args.ratios or []:
        if not 0 < r <= 100:
            raise ValueError(f"--ratios {r:g}: a percentage in (0, 100]")
        out[f"ratio-{r:g}"] = [f"locate.forget_ratio={r}", f"locate.improve_ratio={r}"]
    for w in args.without:
        name = "mask-random" if w == "locate" else f"without-{w}"
        out[name] = CONTROLS[name]
    for m in args.mask:
        out[f"mask-{m}"] = CONTROLS[f"mask-{m}"]
    if not out:
        raise ValueError("nothing to run: give --ratios, --without or --mask")
    return out


def link_reused(parent: Path, child: Path, recipe: Recipe) -> None:
    """Symlink the run's completed step directories that the variant reuses. Refused when one is not complete, or
    when the variant's settings would change it (an override that reaches it: the pipeline would then rerun it
    and write into the run's own directory)."""
    from allo.pipeline import Pipeline
    from allo.steps import REGISTRY

    pipe = Pipeline(recipe)
    reused = [n for n, step in REGISTRY.items() if n not in REDONE and not (step.skip and step.skip(recipe))]
    for name in reused:
        src = parent / name
        manifest = src / "manifest.json"
        done = json.loads(manifest.read_text()) if manifest.exists() else {}
        if not done.get("complete"):
            raise RuntimeError(f"{src}: step {name} of the run is not complete; run `allo run` on the recipe first")
        if done.get("fingerprint") != pipe.fingerprint(name):
            raise RuntimeError(f"the ablation's settings change step {name}, which it reuses from the run ({src}): "
                               f"drop the --set that reaches it (only locate, forget, improve and eval settings may "
                               f"differ), or rerun the run with it first")
    child.mkdir(parents=True, exist_ok=True)
    for name in reused:
        src, dst = parent / name, child / name
        if not dst.is_symlink():
            try:
                dst.symlink_to(src.resolve(), target_is_directory=True)
            except FileExistsError:  # another rank made it
                pass


def main(recipe_path: str, overrides: list[str], args: argparse.Namespace) -> None:
    """Every rank: each variant's pipeline in turn (training steps use every rank, as in `allo run`)."""
    import torch.distributed as dist

    from allo.io import write_json
    from allo.pipeline import run_pipeline

    parent = load_recipe(recipe_path, overrides)
    run = Path(parent.output_dir)
    rows = ["improve"] + (["sft"] if parent.task.alpaca_eval or parent.task.arena_hard else [])  # Table 3: vs SFT
    todo = variants(args)
    for name, extra in todo.items():
        child = run / "ablate" / name
        recipe = load_recipe(recipe_path, [*overrides, *extra, f"output_dir={child}",
                                           f"task.eval_models=[{', '.join(rows)}]"])
        link_reused(run, child, recipe)
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_json(child / "ablation.json", {"variant": name, "settings": extra, "of": str(run)})
        log.info("===== ablation %s: %s =====", name, " ".join(extra))
        run_pipeline(recipe, recipe_path)
    if not dist.is_initialized() or dist.get_rank() == 0:
        from allo.report import report

        made = report(run)
        log.info("ablations %s done: %s", ", ".join(todo), ", ".join(str(p) for p in made))
