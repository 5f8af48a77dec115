"""`allo STEP RECIPE.yaml [--set key=value ...]`: argv -> recipe -> step. No logic of its own.

The steps, their help and their flags come from the registry (`allo.steps`): a training step runs on its own
with --data/--init/--out/--mask, a step with its own command (locate) runs with its flags on one process, and
every other step is `allo run --only STEP`.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Optional

from allo.steps import REGISTRY, STEPS, resolve

COMMANDS = {
    "run": f"All steps in order ({', '.join(STEPS)}), each skipped when its manifest says it is complete; "
           "--from STEP / --only STEP rerun. Launch with torchrun: training steps use every rank.",
    "plan": "Per-GPU memory (model states under the recipe's ZeRO stage, activations, logits, generation engine) "
            "and GPU-hours of every step for --nodes × --gpus-per-node GPUs of --gpu-memory, from the model's "
            "config.json alone; says whether each step fits and, when not, the smallest change that does. Exit 3 "
            "when a step does not fit.",
    "ablate": "The paper's controls over a finished run (--ratios R ... / --without forget|improve|locate / --mask "
              "random|bottom), each a variant run in OUTPUT_DIR/ablate/ that reuses the run's SFT model, pairs, "
              "warm-up and reward model and redoes locate, forget, improve and ALLO's eval. Launch with torchrun; "
              "`allo report OUTPUT_DIR` tables and plots them.",
    "report": "Tables in the paper's layouts (Table 2 accuracy from the eval result files, Table 3 win rates vs "
              "SFT) and PNG plots of a run directory: loss and reward-margin curves per stage, mask fraction per "
              "layer, histogram of token keep-probabilities. Writes RUN_DIR/report/.",
}


def first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (a period, then a space and a capital or a backquote): dots in
    key names (`dpo.loss_type`) and abbreviations in parentheses do not end one."""
    return re.split(r"(?<=\.)\s+(?=[A-Z`])", text.strip(), maxsplit=1)[0].rstrip(".")


def _parser() -> argparse.ArgumentParser:
    from allo.eval.cli import OVERVIEW

    p = argparse.ArgumentParser(prog="allo", description="ALLO training recipes on DeepSpeed. "
                                "Run `allo STAGE --help` for one stage.")
    p.add_argument("--version", action="version", version=f"allo {__import__('allo').__version__}")
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    for name, text in [(n, s.help) for n, s in REGISTRY.items()] + list(COMMANDS.items()):
        extra = {"epilog": OVERVIEW, "formatter_class": argparse.RawDescriptionHelpFormatter} if name == "eval" else {}
        sp = sub.add_parser(name, help=first_sentence(text), description=text, **extra)
        if name == "report":
            sp.add_argument("run_dir", help="a run directory (a recipe's output_dir, e.g. runs/tiny/seed0)")
            continue
        _recipe_arguments(sp)
        if name == "plan":
            resolve("allo.plan:add_arguments")(sp)
            continue
        if name == "ablate":
            resolve("allo.ablate:add_arguments")(sp)
            continue
        step = REGISTRY.get(name)
        if step is not None and step.standalone:
            _training_arguments(sp)
        elif step is not None and step.command:
            resolve(step.command + ":add_arguments")(sp)
    run = sub.choices["run"]
    run.add_argument("--from", dest="start", metavar="STEP", help="rerun from this step on (later steps too)")
    run.add_argument("--only", metavar="STEP[,STEP...]", help="rerun just this step (or these, in pipeline order)")
    masks = sub.add_parser("masks", help="Inspect a neuron mask file",
                           description="`allo masks show MASK`: selected fraction per layer and module, and a PNG "
                                       "heatmap (layer × module).")
    msub = masks.add_subparsers(dest="masks_cmd", required=True)
    show = msub.add_parser("show", help="fraction per layer and module, plus a heatmap PNG",
                           description="Selected fraction per layer and module of a mask file, and a heatmap PNG.")
    show.add_argument("mask", help="a mask file written by `allo locate` (safetensors of bools)")
    show.add_argument("--png", help="heatmap path (default: MASK with .png)")
    cfg = sub.add_parser("config", help="Print the resolved recipe, or every knob with --doc",
                         description="Print the fully resolved recipe (after --set), or document every knob.")
    _recipe_arguments(cfg)
    cfg.add_argument("--doc", action="store_true", help="list every knob with its type, default and meaning")
    return p


def _command_path(argv: list[str]) -> list[str]:
    """The leading words of `argv` that name a command and its subcommand (`eval suite`, `masks show`)."""
    from allo.eval.cli import SUBCOMMANDS

    nested = {"eval": SUBCOMMANDS, "masks": ("show",)}
    if not argv or argv[0] not in set(REGISTRY) | set(COMMANDS) | {"masks", "config"}:
        return []
    return argv[:2] if len(argv) > 1 and argv[1] in nested.get(argv[0], ()) else argv[:1]


def _recipe_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("recipe", nargs="?", help="recipe YAML (defaults apply when omitted)")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value, e.g. --set train.lr=5e-7 (repeatable)")


def _training_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--data", help="records to train on (default: data.train)")
    sp.add_argument("--init", help="starting checkpoint (default: model.path)")
    sp.add_argument("--out", help="output directory (default: OUTPUT_DIR/STAGE)")
    sp.add_argument("--mask", help="neuron mask file (from `allo locate`) restricting the update")


def main(argv: list[str] | None = None) -> int:
    from allo.config import ConfigError, describe, load_recipe, to_dict

    argv = sys.argv[1:] if argv is None else argv
    from allo.eval.cli import SUBCOMMANDS

    if "-h" in argv or "--help" in argv:  # help wherever it stands: the (sub)command's usage, and nothing runs
        argv = _command_path(argv) + ["--help"]

    if len(argv) > 1 and argv[0] == "eval" and argv[1] in SUBCOMMANDS:  # the benchmark suite's own parser
        from allo.eval.cli import main as eval_main

        return eval_main(argv[1:])
    args = _parser().parse_args(argv)
    args.argv = argv
    if args.stage is None:
        _parser().print_help()
        return 0
    rank = int(os.environ.get("RANK", 0))
    terminal = logging.StreamHandler()
    terminal.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                                            datefmt="%H:%M:%S"))
    terminal.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=terminal.level, handlers=[terminal])
    log_file = None
    try:
        if args.stage == "config" and args.doc:
            print("\n".join(describe()))
            return 0
        if args.stage == "masks":
            from allo.masks.show import heatmap, render
            from allo.preflight import check_mask

            check_mask(args.mask, None)
            print(render(args.mask))
            print(heatmap(args.mask, args.png or str(args.mask).rsplit(".", 1)[0] + ".png"))
            return 0
        if args.stage == "report":
            from allo.report import report

            for path in report(args.run_dir):
                print(path.read_text() if path.suffix == ".md" else path)
            return 0
        recipe = load_recipe(args.recipe, args.overrides)
        if args.stage == "plan":
            from allo.plan import main as plan_main

            return plan_main(recipe, args)
        # a log file only under an output_dir the user named (no ./runs/default appears from a bare command)
        named = args.recipe or any(o.startswith("output_dir=") for o in args.overrides)
        log_file = _log_to_file(recipe.output_dir, rank) if args.stage != "config" and named else None
        if args.stage == "config":
            import yaml

            print(yaml.safe_dump(to_dict(recipe), sort_keys=False), end="")
            return 0
        step = REGISTRY.get(args.stage)
        if step is not None and step.command:
            resolve(step.command + ":main")(recipe, args)
            return 0
        if not named and not (step is not None and step.standalone):
            raise ConfigError(f"allo {args.stage} runs pipeline steps under a recipe's output_dir: name a recipe "
                              "(e.g. recipes/tiny/recipe.yaml) or --set output_dir=DIR")
        from allo.engine import finish_distributed
        from allo.signals import EXIT_REQUEUE

        _preflight(args, recipe)
        try:
            _distributed(args, recipe)
        except SystemExit as stop:  # preemption: every rank agreed, checkpointed and stops together
            if stop.code == EXIT_REQUEUE:
                finish_distributed(EXIT_REQUEUE)
            raise
        finish_distributed(0)
    except Exception as e:  # one line on the terminal; the stack goes to the run's log file
        from allo.preflight import InputError

        phrased = isinstance(e, (ConfigError, ValueError, OSError, RuntimeError))
        where = _record_traceback(log_file) if log_file is not None else None
        shown = getattr(e, "shown", rank == 0 or not isinstance(e, (ConfigError, InputError)))  # every rank
        if shown:  # checks the same inputs; a step failure is shown by the rank that recorded it first
            print(f"allo {args.stage}: error: {e if phrased else f'{type(e).__name__}: {e}'}"
                  + (f" (traceback in {where})" if where else ""), file=sys.stderr)
        return 2 if phrased else 1
    return 0


def _log_to_file(output_dir: str, rank: int) -> Optional[Path]:
    """Every log record of this rank also goes to OUTPUT_DIR/logs/allo-rankR.log (appended across runs)."""
    path = Path(output_dir) / "logs" / f"allo-rank{rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:  # an unwritable output dir is reported by the step that writes there
        return None
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)  # the terminal handler keeps its own level
    errors = logging.getLogger("allo.errors")
    errors.propagate = False
    errors.addHandler(handler)
    return path


def _record_traceback(path: Path) -> Path:
    logging.getLogger("allo.errors").error("command failed: %s\n%s", " ".join(sys.argv), traceback.format_exc())
    return path


def _preflight(args: argparse.Namespace, recipe) -> None:
    """Everything the command will need, checked on every rank before any process group or engine starts, every
    problem at once (`allo.preflight.check_command`; the launchers run the same checks before a job is queued)."""
    from allo.preflight import check_command

    check_command(recipe, args.stage, int(os.environ.get("WORLD_SIZE", 1)), data=getattr(args, "data", None),
                  init=getattr(args, "init", None), mask=getattr(args, "mask", None), out=getattr(args, "out", None),
                  start=getattr(args, "start", None), only=getattr(args, "only", None))


def _distributed(args: argparse.Namespace, recipe) -> None:
    """The commands that run on every rank: one training stage on its own, or pipeline steps."""
    from allo.engine import init_distributed

    init_distributed(recipe.distributed.timeout_minutes)  # the recipe's collective timeout, for any stage
    if args.stage == "ablate":
        from allo.ablate import main as ablate

        ablate(args.recipe, args.overrides, args)
        return
    step = REGISTRY.get(args.stage)
    if step is not None and step.standalone:
        from allo.stages.runner import run_standalone

        run_standalone(recipe, step, args)
        return
    from allo.pipeline import run_pipeline

    only = args.stage if step is not None else args.only
    run_pipeline(recipe, args.recipe, start=getattr(args, "start", None), only=only, argv=args.argv)


if __name__ == "__main__":
    raise SystemExit(main())
