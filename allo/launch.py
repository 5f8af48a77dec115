"""Launch planning: world size and batch arithmetic for N nodes × G processes, checked before a job is queued.

`python -m allo.launch RECIPE --nodes N --gpus-per-node G [--set k=v]` prints, per training stage,
global = micro × accumulation × world, and exits 2 with a clear message when a stage's global batch cannot be
split over that world (the same check the engine makes at start-up, made before the queue wait).
"""
from __future__ import annotations

import argparse
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
    if nodes < 1 or gpus_per_node < 1:
        raise LaunchError(f"--nodes {nodes} and --gpus-per-node {gpus_per_node} must both be >= 1")
    recipe = load_recipe(recipe_path, list(overrides))
    world = nodes * gpus_per_node
    sections = {name: s.train.section for name, s in REGISTRY.items() if s.train}
    unknown = [s for s in stages or () if s not in sections]
    if unknown:
        raise LaunchError(f"unknown stage {unknown[0]!r} (training stages: {', '.join(sections)})")
    rows = []
    for stage in stages or list(sections):
        t = recipe.stage_train(sections[stage])
        micro = fit_micro_batch(t.global_batch_size, t.micro_batch_size, world)
        gas = batch_arithmetic(t.global_batch_size, micro, world)
        rows.append({"stage": stage, "global": t.global_batch_size, "micro": micro,
                     "accumulation": gas, "world": world})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m allo.launch", description=__doc__)
    p.add_argument("recipe")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--stage", action="append", help="only these stages (default: every training stage)")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    try:
        rows = plan(args.recipe, args.nodes, args.gpus_per_node, args.overrides, args.stage)
    except (ConfigError, LaunchError) as e:
        print(f"allo launch: {e}", file=sys.stderr)
        return 2
    print(f"world size: {args.nodes} nodes × {args.gpus_per_node} processes = {rows[0]['world']}")
    for r in rows:
        print(f"  {r['stage']:8s} global batch {r['global']} = micro {r['micro']} × accumulation "
              f"{r['accumulation']} × world {r['world']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
