"""Launch planning: the whole command's pre-flight for N nodes × G processes, run before a job is queued.

`python -m allo.launch RECIPE --nodes N --gpus-per-node G [--stage STAGE] [--gpu] [-- ALLO ARGS]` prints, per
training step that will run, global = micro × accumulation × world, then runs every check `allo STAGE RECIPE ALLO
ARGS` makes before its first step (`allo.preflight.command_problems`: files, keys, chat template, upstream outputs,
batch arithmetic, all with the --set values among ALLO ARGS) and, with --gpu, that this Python's torch can use a
GPU. Exit 2 with every problem and its fix; the launchers (slurm/submit.sh, recipes/run_one_node.sh) call it, dry
runs included.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from allo.config import ConfigError, load_recipe
from allo.engine import LaunchError, batch_arithmetic, fit_micro_batch, free_port
from allo.steps import REGISTRY


def torchrun_command(args: list[str], nproc: int) -> list[str]:
    """`python -m allo ARGS` on `nproc` local processes, with a fresh rendezvous port (reused ports flake), through
    allo.torchrun (a failed worker in one line)."""
    return [sys.executable, "-m", "allo.torchrun", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "allo", *args]


def launched_as(args: list[str]) -> str:
    """The shell command that runs `allo ARGS` the way this process was started: under torchrun (by its
    environment) with as many processes per node and nodes, else plain `allo`."""
    import os
    import shlex

    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return shlex.join(["allo", *args])
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))
    launch = ["python", "-m", "allo.torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", "1")]
    launch += ["--nnodes", str(nodes)] if nodes > 1 else []
    return shlex.join([*launch, "-m", "allo", *args])


def plan(recipe_path: str, nodes: int, gpus_per_node: int, overrides: list[str] = (),
         stages: list[str] | None = None) -> list[dict]:
    """global = micro × accumulation × world for each training step (`stages`, default all of them)."""
    if nodes < 1 or gpus_per_node < 1:
        raise LaunchError(f"--nodes {nodes} and --gpus-per-node {gpus_per_node} must both be >= 1")
    return rows(load_recipe(recipe_path, list(overrides)), nodes * gpus_per_node, stages)


def rows(recipe, world: int, stages: list[str] | None = None) -> list[dict]:
    sections = {name: s.train.section for name, s in REGISTRY.items() if s.train}
    unknown = [s for s in stages or () if s not in sections]
    if unknown:
        raise LaunchError(f"unknown stage {unknown[0]!r} (training stages: {', '.join(sections)})")
    out = []
    for stage in sections if stages is None else stages:
        t = recipe.stage_train(sections[stage])
        micro = fit_micro_batch(t.global_batch_size, t.micro_batch_size, world)
        gas = batch_arithmetic(t.global_batch_size, micro, world)
        out.append({"stage": stage, "global": t.global_batch_size, "micro": micro, "accumulation": gas,
                    "world": world})
    return out


def cuda_problems() -> list[str]:
    """A GPU job's Python must have a torch built for GPUs (a CPU build trains on the CPU, hours later)."""
    import torch

    if torch.version.cuda or getattr(torch.version, "hip", None):
        return []
    return [f"{sys.executable}: its torch {torch.__version__} is a CPU build; a GPU job needs a CUDA build: set "
            "ALLO_PYTHON to such an environment's python (`make install-gpu` makes .venv-gpu), or submit with --cpu"]


def packing_problems(recipe, steps: list[str]) -> list[str]:
    """A GPU job's packed training steps need flash attention (`allo.data.tokenize.packing_problem`): said at
    submit time rather than when the step starts on the node."""
    from allo.data.tokenize import packing_problem
    from allo.preflight import training_sections

    out = []
    for name, section, adapted in training_sections(recipe, steps):
        why = adapted.stage_train(section).packing and packing_problem(adapted.model.attn_implementation, "cuda")
        if why:
            out.append(f"{name} ({recipe.train_key(section, 'packing')}): {why}")
    return out


def main(argv: list[str] | None = None) -> int:
    from allo.cli import _parser as allo_parser
    from allo.preflight import Problems, command_problems, steps_to_run, training_sections

    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m allo.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--stage", default="run", help="run (default: the pipeline) or one step (sft, dpo, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--gpu", action="store_true", help="the job runs on GPUs: refuse a CPU-only torch")
    args = p.parse_args(own)
    if args.nodes < 1 or args.gpus_per_node < 1:
        print(f"allo launch: --nodes {args.nodes} and --gpus-per-node {args.gpus_per_node} must both be >= 1",
              file=sys.stderr)
        return 2
    world = args.nodes * args.gpus_per_node
    command = [args.stage, args.recipe, *[x for o in args.overrides for x in ("--set", o)], *extra]
    try:
        parsed = allo_parser().parse_args(command)
    except SystemExit:  # argparse said what is wrong
        print(f"allo launch: not a valid allo command: allo {shlex.join(command)}", file=sys.stderr)
        return 2
    try:
        recipe = load_recipe(parsed.recipe, parsed.overrides)
    except ConfigError as e:
        print(f"allo launch: {e}", file=sys.stderr)
        return 2
    opts = {k: getattr(parsed, k, None) for k in ("data", "init", "mask", "out", "start", "only")}
    problems = (cuda_problems() if args.gpu else []) + command_problems(recipe, parsed.stage, world, **opts)
    print(f"world size: {args.nodes} nodes × {args.gpus_per_node} processes = {world}")
    step = REGISTRY.get(parsed.stage)
    if step is not None and step.standalone:
        steps = [parsed.stage]
    elif parsed.stage == "run" or step is not None:
        try:
            steps = [n for n, _, _ in training_sections(recipe, steps_to_run(recipe, parsed.stage, opts["start"],
                                                                             opts["only"]))]
        except ValueError:  # an unknown step: among the problems
            steps = []
    else:
        steps = []
    if args.gpu:
        problems += packing_problems(recipe, steps)
    for name in steps:
        try:
            (r,) = rows(recipe, world, [name])
        except LaunchError:  # among the problems, with the key that set it
            continue
        print(f"  {r['stage']:8s} global batch {r['global']} = micro {r['micro']} × accumulation "
              f"{r['accumulation']} × world {r['world']}")
    if problems:
        print(f"allo launch: {Problems(problems)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
