"""The pipeline's eval step: the run's models on the recipe's held-out problems and benchmarks."""
from __future__ import annotations

import logging

from allo.io import write_json
from allo.steps import Context

log = logging.getLogger(__name__)


def eval_step(ctx: Context) -> dict:
    """Greedy accuracy on task.eval, the task.benchmarks (Table 2) and, for instruction following, win rates
    against the SFT model judged by task.judge (Table 3), for SFT and every model with a table row."""
    from allo.eval import suite
    from allo.eval.provenance import harness
    from allo.stages.sampling import accuracy, load_problems

    r, t = ctx.recipe, ctx.recipe.task
    if not (t.eval or t.benchmarks or t.alpaca_eval or t.arena_hard):
        raise ValueError("nothing to evaluate: set task.eval, task.benchmarks, task.alpaca_eval or task.arena_hard")
    models = ctx.models()
    out = ctx.dir("eval")
    result: dict = {"models": models, "decoding": "greedy", "max_new_tokens": t.eval_max_new_tokens, **harness()}
    if t.eval:
        problems = load_problems(t.eval, "task.eval")
        acc = {name: accuracy(path, problems, r.data.template, t.family, t.eval_max_new_tokens, r.generation)
               for name, path in models.items()}
        result.update(accuracy=acc, eval_data=t.eval, problems=len(problems))
        log.info("held-out accuracy: %s", {k: f"{100 * v:.1f}%" for k, v in acc.items()})
    if t.benchmarks:
        result["table2"] = suite.table2(models, t, r.data.template, out, r.generation)
    if t.alpaca_eval or t.arena_hard:
        result["table3"] = suite.table3(models, t, r.data.template, out, r.generation)
    write_json(out / "results.json", result)
    return {k: result[k] for k in ("accuracy", "table2", "table3") if k in result}
