"""The pipeline's eval step: the run's models on the recipe's held-out problems and benchmarks.

Held-out accuracy is sharded over the ranks (`allo.sharding`): units of `generation.batch_size` problems of one
model, each rank loading a model once for all of its units of that model. The benchmark tables (Table 2, and
Table 3's judged win rates) then run on rank 0 while the other ranks wait on a file.
"""
from __future__ import annotations

import logging
from typing import Optional

from allo.io import write_json
from allo.sharding import run_sharded, units_of
from allo.steps import Context

log = logging.getLogger(__name__)


def eval_step(ctx: Context) -> Optional[dict]:
    """Greedy accuracy on task.eval, the task.benchmarks (Table 2) and, for instruction following, win rates
    against the SFT model judged by task.judge (Table 3), for SFT and every model with a table row."""
    from allo.eval.provenance import harness

    r, t = ctx.recipe, ctx.recipe.task
    if not (t.eval or t.benchmarks or t.alpaca_eval or t.arena_hard):
        raise ValueError("nothing to evaluate: set task.eval, task.benchmarks, task.alpaca_eval or task.arena_hard")
    models = ctx.models()
    acc = held_out_accuracy(ctx, models) if t.eval else None
    if ctx.sync.rank != 0:
        return None
    from allo.eval import suite

    out = ctx.dir("eval")
    result: dict = {"models": models, "decoding": "greedy", "max_new_tokens": t.eval_max_new_tokens, **harness()}
    if acc is not None:
        result.update(accuracy=acc, eval_data=t.eval, problems=len(_problems(t.eval)))
        log.info("held-out accuracy: %s", {k: f"{100 * v:.1f}%" for k, v in acc.items()})
    if t.benchmarks:
        result["table2"] = suite.table2(models, t, r.data.template, out, r.generation)
    if t.alpaca_eval or t.arena_hard:
        result["table3"] = suite.table3(models, t, r.data.template, out, r.generation)
    write_json(out / "results.json", result)
    return {k: result[k] for k in ("accuracy", "table2", "table3") if k in result}


def held_out_accuracy(ctx: Context, models: dict[str, str]) -> Optional[dict[str, float]]:
    """Greedy accuracy of every model on task.eval, every rank taking its units; the result on rank 0."""
    from allo.generate import Sampling, load_generator, release
    from allo.stages.sampling import sample

    r, t = ctx.recipe, ctx.recipe.task
    problems = _problems(t.eval)
    paths = list(models.values())
    n = len(problems)
    units = [u for m in range(len(paths)) for u in units_of(n, r.generation.batch_size, start=m * n)]
    loaded: dict = {}

    def work(k: int, idx: range) -> list[list[bool]]:
        path = paths[idx[0] // n]
        if loaded.get("path") != path:  # one model at a time on this rank
            loaded.clear()
            release()
            loaded.update(path=path, generator=load_generator(path, r.generation))
        model, tok = loaded["generator"]
        rows = sample(path, [problems[i % n] for i in idx], r.data.template,
                      Sampling(n=1, temperature=0.0, max_new_tokens=t.eval_max_new_tokens), t.family, tok,
                      r.generation, model)
        return [[row["correct"]] for row in rows]

    correct = run_sharded(ctx.sync, ctx.dir("eval"), units, work)
    loaded.clear()
    if correct is None:
        return None
    return {name: sum(correct[m * n:(m + 1) * n]) / max(1, n) for m, name in enumerate(models)}


def _problems(path: str) -> list[dict]:
    from allo.stages.sampling import load_problems

    return load_problems(path, "task.eval")
