"""`allo STAGE RECIPE.yaml [--set key=value ...]`: argv -> recipe -> stage function. No logic of its own."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

STAGE_HELP = {
    "sft": "Supervised fine-tuning on {prompt, response} records (also trains the tiny model and the token "
           "reward model). Full-parameter, on the shared DeepSpeed loop.",
    "sample": "Sample n responses per training problem from the SFT model (vLLM when present with a GPU, else "
              "batched Hugging Face generation) and label each by its final answer.",
    "pairs": "Build (correct, wrong) preference pairs per problem from the samples, at most 5 per problem, seeded.",
    "warmup": "Plain full-parameter DPO from the SFT model for one epoch (spec §1): the reference run whose weight "
              "changes |θ'−θ|/α rank the neurons.",
    "locate": "Rank every parameter element by |θ'−θ|/α and write the N1 (forget) and N2 (improve) masks.",
    "reward-data": "Minimum-edit rewrites of wrong responses by a teacher (OpenAI-compatible endpoint or the "
                   "programmatic teacher) for training the token reward model.",
    "reward-train": "Train the small token reward model (an LM sharing the policy's tokenizer) on the rewrites.",
    "reward-score": "Score every token of every wrong response with the reward model's keep-probability p_ij.",
    "forget": "ALLO stage 2: token-weighted NPO on wrong responses, updating only the N1 mask (spec §3).",
    "improve": "ALLO stage 3: DPO with noise-token masking, updating only the N2 mask (spec §4).",
    "dpo": "Baseline DPO (or IPO / SimPO with dpo.loss_type) from the SFT model on the same loop.",
    "npo": "Baseline sequence-level NPO on the rejected responses on the same loop.",
    "eval": "Greedy accuracy of the run's SFT, DPO, NPO and ALLO models on task.eval (the pipeline's eval step). "
            "The benchmark suite has subcommands: `allo eval bench|score|answer|alpaca|alpaca-score|arena --help`.",
    "run": "All steps in order (sft, sample, pairs, warmup, locate, reward-data, reward-train, reward-score, "
           "forget, improve, dpo, npo, eval), each skipped when its manifest says it is complete; --from STEP / "
           "--only STEP rerun. Launch with torchrun: training steps use every rank.",
    "report": "Tables in the paper's layouts (Table 2 accuracy from the eval result files, Table 3 win rates vs "
              "SFT) and PNG plots of a run directory: loss and reward-margin curves per stage, mask fraction per "
              "layer, histogram of token keep-probabilities. Writes RUN_DIR/report/.",
}
TRAINING = ("sft", "warmup", "dpo", "npo", "forget", "improve")
PIPELINE_STEPS = ("sample", "pairs", "reward-data", "reward-train", "reward-score", "eval")  # = allo run --only


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="allo", description="ALLO training recipes on DeepSpeed. "
                                "Run `allo STAGE --help` for one stage.")
    p.add_argument("--version", action="version", version=f"allo {__import__('allo').__version__}")
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    for name, text in STAGE_HELP.items():
        sp = sub.add_parser(name, help=text.split(".")[0], description=text)
        if name == "report":
            sp.add_argument("run_dir", help="a run directory (a recipe's output_dir, e.g. runs/tiny/seed0)")
            continue
        sp.add_argument("recipe", nargs="?", help="recipe YAML (defaults apply when omitted)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.lr=5e-7 (repeatable)")
        if name in TRAINING:
            sp.add_argument("--data", help="records to train on (default: data.train)")
            sp.add_argument("--init", help="starting checkpoint (default: model.path)")
            sp.add_argument("--out", help=f"output directory (default: OUTPUT_DIR/{name})")
            sp.add_argument("--mask", help="neuron mask file (safetensors of bools) restricting the update")
    run = sub.choices["run"]
    run.add_argument("--from", dest="start", metavar="STEP", help="rerun from this step on (later steps too)")
    run.add_argument("--only", metavar="STEP", help="rerun just this step")
    loc = sub.choices["locate"]
    loc.add_argument("--base", help="starting checkpoint θ (default: OUTPUT_DIR/sft/model, else model.path)")
    loc.add_argument("--tuned", help="warm-up checkpoint θ' (default: OUTPUT_DIR/warmup/model)")
    loc.add_argument("--lr", type=float, help="warm-up learning rate α (default: the recipe's warmup lr)")
    loc.add_argument("--ratio", type=float, nargs="+", help="percentages to select; writes topR.safetensors each "
                     "(default: the recipe's N1 forget_ratio and N2 improve_ratio as n1/n2)")
    loc.add_argument("--out", help="output directory (default: OUTPUT_DIR/locate)")
    masks = sub.add_parser("masks", help="Inspect a neuron mask file",
                           description="`allo masks show MASK`: selected fraction per layer and module, and a PNG "
                                       "heatmap (layer × module).")
    msub = masks.add_subparsers(dest="masks_cmd", required=True)
    show = msub.add_parser("show", help="fraction per layer and module, plus a heatmap PNG")
    show.add_argument("mask", help="a mask file written by `allo locate` (safetensors of bools)")
    show.add_argument("--png", help="heatmap path (default: MASK with .png)")
    cfg = sub.add_parser("config", help="Print the resolved recipe, or every knob with --doc",
                         description="Print the fully resolved recipe (after --set), or document every knob.")
    cfg.add_argument("recipe", nargs="?")
    cfg.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cfg.add_argument("--doc", action="store_true", help="list every knob with its type, default and meaning")
    return p


def main(argv: list[str] | None = None) -> int:
    from allo.config import ConfigError, describe, load_recipe, to_dict

    argv = sys.argv[1:] if argv is None else argv
    from allo.eval.cli import SUBCOMMANDS

    if len(argv) > 1 and argv[0] == "eval" and argv[1] in SUBCOMMANDS:  # the benchmark suite's own parser
        from allo.eval.cli import main as eval_main

        return eval_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.stage is None:
        _parser().print_help()
        return 0
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.stage == "config" and args.doc:
            print("\n".join(describe()))
            return 0
        if args.stage == "masks":
            from allo.masks.show import heatmap, render

            print(render(args.mask))
            print(heatmap(args.mask, args.png or str(args.mask).rsplit(".", 1)[0] + ".png"))
            return 0
        if args.stage == "report":
            from allo.report import report

            for path in report(args.run_dir):
                print(path.read_text() if path.suffix == ".md" else path)
            return 0
        recipe = load_recipe(args.recipe, args.overrides)
        if args.stage == "config":
            import yaml

            print(yaml.safe_dump(to_dict(recipe), sort_keys=False), end="")
            return 0
        if args.stage == "locate":
            from allo.stages.locate import run_locate

            run_locate(recipe, base=args.base, tuned=args.tuned, lr=args.lr, ratios=args.ratio, out_dir=args.out)
            return 0
        if args.stage == "run" or args.stage in PIPELINE_STEPS or args.stage in TRAINING:
            from allo.engine import finish_distributed
            from allo.train import EXIT_REQUEUE

            try:
                _distributed(args, recipe)
            except SystemExit as stop:  # preemption: every rank agreed, checkpointed and stops together
                if stop.code == EXIT_REQUEUE:
                    finish_distributed(EXIT_REQUEUE)
                raise
            finish_distributed(0)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"allo {args.stage}: error: {e}", file=sys.stderr)
        return 2
    raise AssertionError(f"allo: stage {args.stage!r} has no handler")  # argparse admits only handled stages


def _distributed(args: argparse.Namespace, recipe) -> None:
    """The commands that run on every rank: one training stage, or pipeline steps."""
    if args.stage in TRAINING:
        from allo.stages.runner import run_stage

        out = args.out or str(Path(recipe.output_dir) / args.stage)
        masks = str(Path(out) / "masks") if args.stage == "warmup" and recipe.locate.from_partitions else None
        run_stage(recipe, args.stage, data=args.data, init=args.init, mask=args.mask, out_dir=out, locate_out=masks)
        return
    from allo.pipeline import run_pipeline

    only = args.stage if args.stage in PIPELINE_STEPS else args.only
    run_pipeline(recipe, args.recipe, start=getattr(args, "start", None), only=only)


if __name__ == "__main__":
    raise SystemExit(main())
