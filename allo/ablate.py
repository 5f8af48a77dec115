"""`allo ablate RECIPE`: the paper's controls over a finished run, one command each.

Each control is a variant run in OUTPUT_DIR/ablate/VARIANT whose recipe is the run's plus the variant's settings.
It reuses the run's SFT model, samples, pairs, warm-up, token reward model and baselines (its step directories
are symlinks to the run's) and redoes only what the variant changes: locate, forget, improve, and the eval of
ALLO's model (`task.eval_models`). The pipeline's fingerprints guarantee the reuse is exact: a linked step whose
settings differed would be rerun, so only steps the variant's settings cannot reach are linked.

- `--ratios R|N1:N2 ...`: the mask-ratio sweep, N1 = N2 = R% (the paper's inverted U around 10-15%), or N1 and
  N2 apart (`10:15` is the paper recipes' own pair);
- `--without forget|improve`: ALLO without a stage (`forget.enabled` / `improve.enabled` false: the step passes
  its starting model through);
- `--without locate`: forget and improve on every parameter (100% masks), the paper's control for locating;
- `--without token-reward`: forget with the same weight on every token of a wrong response (`forget.token_weight:
  uniform`), so the reward model picks no token;
- `--without noise-mask`: improve keeps every rejected token (`improve.epsilon: 1`), plain DPO inside N2;
- `--mask random|bottom`: the random-mask and bottom-k% controls at the run's ratios (random masks of the same
  sizes are the control for *which* elements locate picks).
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
            "without-locate": ["locate.forget_ratio=100", "locate.improve_ratio=100"],
            "without-token-reward": ["forget.token_weight=uniform"], "without-noise-mask": ["improve.epsilon=1.0"],
            "mask-random": ["locate.random=true"], "mask-bottom": ["locate.bottom=true"]}


def _downstream_of_redone() -> list[str]:
    """Steps after the redone ones that read their outputs (the step-matched DPO reads forget's and improve's step
    counts): a variant switches them off rather than train them again."""
    from allo.steps import REGISTRY

    reach: set[str] = set(REDONE)
    for name, step in REGISTRY.items():
        if name not in REDONE and reach.intersection(step.upstream):
            reach.add(name)
    return [n for n in REGISTRY if n in reach and n not in REDONE]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratios", nargs="+", metavar="R|N1:N2",
                        help="mask-ratio sweep: N1 = N2 = R%% each, or N1:N2 (e.g. 10:15)")
    parser.add_argument("--without", nargs="+", default=[],
                        choices=["forget", "improve", "locate", "token-reward", "noise-mask"],
                        help="ALLO without a stage, without locate (100%% masks), without the token reward (uniform "
                             "forget weights) or without the noise mask (every rejected token kept)")
    parser.add_argument("--mask", nargs="+", choices=["random", "bottom"], default=[],
                        help="random-mask and bottom-k%% controls at the run's ratios")


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
    """Variant name -> its recipe overrides, in the order asked (`--without locate`: forget and improve on every
    parameter, 100% masks; `--mask random`: a random mask of the run's sizes)."""
    out: dict[str, list[str]] = {}
    for spec in args.ratios or []:
        n1, _, n2 = str(spec).partition(":")
        try:
            r1, r2 = float(n1), float(n2 or n1)
        except ValueError:
            raise ValueError(f"--ratios {spec}: a percentage R or a pair N1:N2, e.g. 10 or 10:15") from None
        for r in (r1, r2):
            if not 0 < r <= 100:
                raise ValueError(f"--ratios {spec}: {r:g} is not a percentage in (0, 100]")
        out[f"ratio-{r1:g}" + (f"-{r2:g}" if r2 != r1 else "")] = [f"locate.forget_ratio={r1}",
                                                                  f"locate.improve_ratio={r2}"]
    for w in args.without:
        out[f"without-{w}"] = CONTROLS[f"without-{w}"]
    for m in args.mask:
        out[f"mask-{m}"] = CONTROLS[f"mask-{m}"]
    if not out:
        raise ValueError("nothing to run: give --ratios, --without or --mask")
    return out


def link_reused(parent: Path, child: Path, recipe: Recipe) -> None:
    """Symlink the run's completed step directories that the variant reuses, skipped steps included (a variant then
    follows the run when a later run switches one on). Refused when one is not complete, or
    when the variant's settings would change it (an override that reaches it: the pipeline would then rerun it
    and write into the run's own directory)."""
    from allo.manifests import Fingerprints
    from allo.steps import REGISTRY

    fingerprints = Fingerprints(recipe, parent)  # the variant's settings against the run's own manifests
    off = _downstream_of_redone()  # switched off in the variant: its own skip record, never the run's
    # a step the recipe skips and the run has no record of (the run predates the step): the variant's own record
    unknown = {n for n, s in REGISTRY.items() if s.skip and s.skip(recipe) and not (parent / n).exists()}
    reused = [n for n in REGISTRY if n not in REDONE and n not in off and n not in unknown]
    for name in reused:
        src = parent / name
        manifest = src / "manifest.json"
        done = json.loads(manifest.read_text()) if manifest.exists() else {}
        if not done.get("complete"):
            raise RuntimeError(f"{src}: step {name} of the run is not complete; run `allo run` on the recipe first")
        if done.get("fingerprint") != fingerprints.of(name):
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
    from allo.steps import REGISTRY

    parent = load_recipe(recipe_path, overrides)
    run = Path(parent.output_dir)
    rows = ["improve"] + (["sft"] if parent.task.alpaca_eval or parent.task.arena_hard else [])  # Table 3: vs SFT
    todo = variants(args)
    off = [f"{REGISTRY[n].train.section}.enabled=false" for n in _downstream_of_redone()]
    for name, extra in todo.items():
        child = run / "ablate" / name
        recipe = load_recipe(recipe_path, [*overrides, *extra, *off, f"output_dir={child}",
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
