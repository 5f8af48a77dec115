"""Data and recipe adapters of the matched baselines (allo.steps._matched) that need more than a recipe section."""
from __future__ import annotations

import logging
from dataclasses import replace

from allo.config import DPONLLConfig, Recipe
from allo.io import read_jsonl, write_jsonl
from allo.steps import Context

log = logging.getLogger(__name__)


def dpo_recipe(recipe: Recipe, section: str) -> Recipe:
    """A matched DPO baseline's objective: the dpo section's, with the baseline's own β where it sets one and, for
    DPO+NLL, its NLL weight (each baseline's knobs are then tuned apart from DPO's)."""
    own = getattr(recipe, section)
    dpo = recipe.dpo if own.beta is None else replace(recipe.dpo, beta=own.beta)
    if isinstance(own, DPONLLConfig):
        dpo = replace(dpo, nll_weight=own.nll_weight)
    return replace(recipe, dpo=dpo)


def pairs_rewrites_step(ctx: Context) -> dict:
    """pairs/pairs.jsonl then reward-data/pairs.jsonl -> pairs-rewrites/pairs.jsonl (fields both have)."""
    sampled, rewrites = read_jsonl(ctx.path("pairs/pairs.jsonl")), read_jsonl(ctx.path("reward-data/pairs.jsonl"))
    keys = ("prompt", "chosen", "rejected")
    write_jsonl(ctx.dir("pairs-rewrites") / "pairs.jsonl", [{k: p[k] for k in keys} for p in sampled + rewrites])
    return {"sampled_pairs": len(sampled), "rewrite_pairs": len(rewrites)}


def rft_data_step(ctx: Context) -> dict:
    """One {prompt, response: gold reference} per distinct sampled problem that has a reference solution
    (rft-data/sft.jsonl); problems without one are counted, not used."""
    records, seen, without = [], set(), 0
    for row in read_jsonl(ctx.path("sample/samples.jsonl")):
        if row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        if row.get("reference"):
            records.append({"prompt": row["prompt"], "response": row["reference"]})
        else:
            without += 1
    if not records:
        raise ValueError(f"rft-data: none of the {len(seen)} sampled problems has a reference solution (the "
                         f"`reference` field of task.problems); the RFT baselines need them")
    if without:
        log.info("rft-data: %d of %d sampled problems have no reference solution; left out", without, len(seen))
    write_jsonl(ctx.dir("rft-data") / "sft.jsonl", records)
    return {"problems": len(records), "without_reference": without}
