"""`allo locate`: resolve checkpoints and ratios from a recipe (or flags), run the streaming locator, log."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from allo.config import Recipe
from allo.masks.locate import locate

log = logging.getLogger(__name__)


def run_locate(recipe: Recipe, *, base: Optional[str] = None, tuned: Optional[str] = None,
               lr: Optional[float] = None, ratios: Optional[Sequence[float]] = None,
               out_dir: Optional[str] = None) -> dict[str, Path]:
    run = Path(recipe.output_dir)
    sft = run / "sft" / "model"
    base = base or (str(sft) if sft.exists() else recipe.model.path)
    tuned = tuned or str(run / "warmup" / "model")
    lr = lr if lr is not None else recipe.stage_train("warmup").lr
    loc = recipe.locate
    named = ({f"top{r:g}": r for r in ratios} if ratios else
             {"n1": loc.forget_ratio, "n2": loc.improve_ratio})
    out = Path(out_dir or run / "locate")
    log.info("locate: θ=%s θ'=%s α=%g scope=%s ratios=%s -> %s", base, tuned, lr, loc.scope, named, out)
    res = locate(base, tuned, lr, named, out, scope=loc.scope, band_start=loc.band_start, bottom=loc.bottom)
    log.info("locate: %d elements in %.1f s; achieved %s", res.summary["elements"], res.summary["seconds"],
             {k: f"{v:.4f}%" for k, v in res.summary["achieved"].items()})
    return res.paths


def locate_in_run(recipe: Recipe, strategy, engine, named: list, base: str, out_dir: str) -> dict[str, Path]:
    """At the end of a warm-up run: masks from the ZeRO partitions of θ' (every rank calls this together)."""
    import time

    from allo.masks.apply import partition_slices
    from allo.masks.locate_partitioned import locate_partitioned

    loc = recipe.locate
    t0 = time.perf_counter()
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in named}
    paths = locate_partitioned(partition_slices(engine, named), shapes, base, recipe.stage_train("warmup").lr,
                               {"n1": loc.forget_ratio, "n2": loc.improve_ratio}, out_dir, strategy,
                               scope=loc.scope, band_start=loc.band_start, bottom=loc.bottom,
                               source=f"ZeRO-{strategy.zero_stage} partitions of the warm-up run, {strategy.world} ranks")
    if strategy.is_rank0:
        log.info("locate from partitions (%d ranks): %s in %.1f s", strategy.world, {k: str(v) for k, v in paths.items()},
                 time.perf_counter() - t0)
    return paths
