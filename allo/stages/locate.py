"""`allo locate`: resolve checkpoints and ratios from a recipe (or flags), run the streaming locator, log."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

from allo.config import Recipe
from allo.masks.locate import locate
from allo.steps import Context

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
    log.info("locate: θ=%s θ'=%s α=%g scope=%s ratios=%s%s -> %s", base, tuned, lr, loc.scope, named,
             f" (random, seed {recipe.seed})" if loc.random else " (bottom)" if loc.bottom else "", out)
    res = locate(base, tuned, lr, named, out, scope=loc.scope, band_start=loc.band_start, bottom=loc.bottom,
                 collect_cap=loc.collect_cap, threads=loc.threads, random_seed=recipe.seed if loc.random else None)
    log.info("locate: %d elements in %.1f s; achieved %s", res.summary["elements"], res.summary["seconds"],
             {k: f"{v:.4f}%" for k, v in res.summary["achieved"].items()})
    return res.paths


def locate_step(ctx: Context) -> dict:
    """The pipeline's locate step: the warm-up run's own masks when it made them from its partitions
    (`locate.from_partitions`) and they match the recipe, else the streaming locator on the exported models."""
    if ctx.recipe.locate.from_partitions and not ctx.recipe.locate.random:
        taken = _masks_from_warmup(ctx)
        if taken:
            return taken
    fp32 = ctx.dir("warmup") / "model_fp32"
    tuned = fp32 if ctx.recipe.locate.export_fp32 and fp32.exists() else ctx.dir("warmup") / "model"
    paths = run_locate(ctx.recipe, base=ctx.sft_model, tuned=str(tuned), out_dir=str(ctx.dir("locate")))
    return {"masks": {k: str(v) for k, v in paths.items()}, "tuned": str(tuned)}


def _masks_from_warmup(ctx: Context) -> Optional[dict]:
    """The masks the warm-up run computed from its partitions, if they match the recipe's ratios and scope."""
    src, dst, loc = ctx.dir("warmup") / "masks", ctx.dir("locate"), ctx.recipe.locate
    want = {"n1": loc.forget_ratio, "n2": loc.improve_ratio}
    for label, ratio in want.items():
        meta = src / f"{label}.json"
        m = json.loads(meta.read_text()) if meta.exists() else {}
        if (m.get("ratio"), m.get("scope"), m.get("band_start"), m.get("bottom")) != (
                ratio, loc.scope, loc.band_start, loc.bottom):
            log.info("locate: the warm-up run's masks do not match the recipe (%s); locating from the exported "
                     "model instead", meta)
            return None
    dst.mkdir(parents=True, exist_ok=True)
    for label in want:
        for ext in (".safetensors", ".json"):
            shutil.copyfile(src / f"{label}{ext}", dst / f"{label}{ext}")
    return {"masks": {label: str(dst / f"{label}.safetensors") for label in want}, "from_partitions": True}


def add_arguments(parser) -> None:
    """`allo locate`'s own flags: it runs on one process, on any two checkpoints."""
    parser.add_argument("--base", help="starting checkpoint θ (default: OUTPUT_DIR/sft/model, else model.path)")
    parser.add_argument("--tuned", help="warm-up checkpoint θ' (default: OUTPUT_DIR/warmup/model)")
    parser.add_argument("--lr", type=float, help="warm-up learning rate α (default: the recipe's warmup lr)")
    parser.add_argument("--ratio", type=float, nargs="+", help="percentages to select; writes topR.safetensors "
                        "each (default: the recipe's N1 forget_ratio and N2 improve_ratio as n1/n2)")
    parser.add_argument("--out", help="output directory (default: OUTPUT_DIR/locate)")


def main(recipe: Recipe, args) -> None:
    from allo.preflight import model_dir

    for path in (args.base, args.tuned):
        if path:
            model_dir(path, tokenizer=False)
    run_locate(recipe, base=args.base, tuned=args.tuned, lr=args.lr, ratios=args.ratio, out_dir=args.out)


def after_warmup(recipe: Recipe, strategy, engine, named: list, base: str, out_dir: Path) -> None:
    """Collective, at the end of the warm-up run: what the recipe asks of its fp32 master weights, the masks
    (`locate.from_partitions`) and a copy on disk (`locate.export_fp32`)."""
    if recipe.locate.from_partitions:
        locate_in_run(recipe, strategy, engine, named, base, str(Path(out_dir) / "masks"))
    if recipe.locate.export_fp32:
        export_fp32(strategy, engine, named, Path(out_dir) / "model_fp32")


def export_fp32(strategy, engine, named: list, out_dir: Path) -> Path:
    """Collective: the fp32 master weights as a safetensors checkpoint (with the model's config), gathered to rank 0
    and written one tensor at a time, so no rank holds the whole model."""
    import math

    import torch

    from allo.io import SafetensorsWriter
    from allo.masks.apply import fp32_masters

    local = fp32_masters(engine, named)
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in named}
    names = sorted(shapes)
    writer = SafetensorsWriter(out_dir / "model.safetensors",
                               [(n, "F32", shapes[n], 4 * math.prod(shapes[n])) for n in names]) \
        if strategy.is_rank0 else None
    for n in names:
        mine = [(start, values.detach().float().cpu()) for name, start, values in local if name == n]
        parts = [mine] if strategy.zero_stage == 0 else strategy.gather_object(mine)  # collective (ZeRO-1/2/3)
        if writer is not None:
            full = torch.empty(math.prod(shapes[n]), dtype=torch.float32)
            for part in parts:
                for start, values in part:
                    full[start:start + values.numel()] = values
            writer.write(n, full.numpy().tobytes())
    if writer is not None:
        writer.close()
        engine.module.config.to_json_file(str(out_dir / "config.json"))
        log.info("fp32 master weights of the warm-up run: %s", out_dir)
    strategy.barrier()
    return out_dir


def locate_in_run(recipe: Recipe, strategy, engine, named: list, base: str, out_dir: str) -> dict[str, Path]:
    """At the end of a warm-up run: masks from the ZeRO partitions of θ' (every rank calls this together)."""
    import time

    from allo.masks.apply import fp32_masters, partition_slices
    from allo.masks.locate_partitioned import locate_partitioned

    loc = recipe.locate
    t0 = time.perf_counter()
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in named}
    # one rank holds every element, whatever the stage (ZeRO-0 when train.single_rank is fast)
    slices = fp32_masters(engine, named) if strategy.world == 1 else partition_slices(engine, named)
    paths = locate_partitioned(slices, shapes, base, recipe.stage_train("warmup").lr,
                               {"n1": loc.forget_ratio, "n2": loc.improve_ratio}, out_dir, strategy,
                               scope=loc.scope, band_start=loc.band_start, bottom=loc.bottom,
                               collect_cap=loc.collect_cap, threads=loc.threads,
                               source=f"ZeRO-{strategy.zero_stage} partitions of the warm-up run, "
                                      f"{strategy.world} ranks")
    if strategy.is_rank0:
        log.info("locate from partitions (%d ranks): %s in %.1f s", strategy.world,
                 {k: str(v) for k, v in paths.items()}, time.perf_counter() - t0)
    return paths
