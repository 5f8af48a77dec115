"""The token reward model's steps (docs/method.md §2): teacher rewrites -> reward-model data, and per-token scoring.

The reward model itself trains as an ordinary training step (`reward-train` in `allo.steps`: the sft objective
with the `reward` section's settings and `reward_model_recipe`'s data settings).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

from allo.config import Recipe
from allo.io import read_jsonl, write_jsonl
from allo.sharding import run_sharded, units_of
from allo.steps import Context

log = logging.getLogger(__name__)


def reward_model_recipe(recipe: Recipe, section: str) -> Recipe:
    """The reward model reads rewrite prompts as they are, with its section's (reward's) lengths."""
    rw = getattr(recipe, section)
    return replace(recipe, data=replace(recipe.data, template="raw", max_length=rw.max_length,
                                        max_prompt_length=rw.max_prompt_length))


def reward_items(wrong: list[dict]) -> list[dict]:
    """Every distinct wrong response once (the records of pairs/wrong.jsonl) with its reference: the problem's
    reference solution, a right sample, or for instruction following the chosen response (what the teacher edits
    towards, docs/method.md §2)."""
    return [{"prompt": _text(p["prompt"], "user"), "wrong": _text(p["rejected"]), "reference": _text(p["reference"]),
             "answer": p.get("answer", "")} for p in wrong]


def limited(rows: list[dict], limit: Optional[int], what: str) -> list[dict]:
    """The first `limit` (data.limit) wrong responses: no teacher call or score for one that no step trains on."""
    if limit is None or len(rows) <= limit:
        return rows
    log.info("data.limit %d: %s the first %d of %d wrong responses", limit, what, limit, len(rows))
    return rows[:limit]


def reward_data_step(ctx: Context) -> Optional[dict]:
    """The teacher's minimum-edit rewrites, kept when right, plus "keep" copies -> reward-data/reward.jsonl, and the
    kept rewrites as preference pairs over the wrong responses -> reward-data/pairs.jsonl (the dpo-rewrites
    baseline's data). Sharded over the ranks: each calls the teacher for its units of wrong responses."""
    from allo.guards import check_rewrites
    from allo.reward.model import reward_data
    from allo.reward.teacher import check_programmatic, llm_rewrites, programmatic_rewrites, python_rewrites
    from allo.tasks import is_correct

    r = ctx.recipe
    wrong = limited(read_jsonl(ctx.path("pairs/wrong.jsonl")), r.data.limit, "the teacher rewrites")
    items = reward_items(wrong)
    family = r.task.family
    is_right = (lambda text, gold: bool(text.strip())) if family == "instruct" else (
        lambda text, gold: is_correct(text, gold, family))
    if r.reward.teacher == "openai":
        from allo.openai_client import ChatClient

        client = ChatClient(r.reward.teacher_endpoint.endpoint("reward.teacher_endpoint"),
                            cache_dir=r.reward.teacher_cache or str(ctx.dir("reward-data") / "cache"))
        teacher, unit = (lambda sub: llm_rewrites(client, sub)), 4 * r.reward.teacher_endpoint.concurrency
    elif r.reward.teacher.startswith("python:"):
        teacher, unit = python_rewrites(r.reward.teacher), 256
    else:
        check_programmatic(items)
        teacher, unit = programmatic_rewrites, 256

    def work(k: int, idx: range) -> list[list[dict]]:
        sub = [items[i] for i in idx]
        out = []
        for i, it, fixed in zip(idx, sub, teacher(sub)):
            records, counts = reward_data([it], [fixed], is_right)
            pair = [{"prompt": wrong[i]["prompt"], "chosen": fixed, "rejected": wrong[i]["rejected"]}] if (
                counts["kept"]) else []
            out.append([{"outcome": next(c for c in ("kept", "rewrite_wrong", "teacher_failed") if counts[c]),
                         "records": records, "pairs": pair}])
        return out

    rows = run_sharded(ctx.sync, "reward-data", ctx.shards("reward-data"), units_of(len(items), unit), work)
    if rows is None:
        return None
    write_jsonl(ctx.dir("reward-data") / "reward.jsonl", [rec for row in rows for rec in row["records"]])
    write_jsonl(ctx.dir("reward-data") / "pairs.jsonl", [p for row in rows for p in row["pairs"]])
    counts = {"items": len(items), **{c: sum(row["outcome"] == c for row in rows)
                                      for c in ("kept", "rewrite_wrong", "teacher_failed")}}
    log.info("reward data: %s", counts)
    check_rewrites(counts, r.guards)
    return counts


def reward_score_step(ctx: Context) -> Optional[dict]:
    """p_ij for every token of every wrong response -> reward-score/forget.jsonl (the forget step's records),
    sharded over the ranks in units of 32 responses."""
    import torch
    from transformers import AutoModelForCausalLM

    from allo.generate import device_and_dtype
    from allo.model import load_tokenizer
    from allo.guards import check_flagged
    from allo.losses import token_weights
    from allo.reward.model import keep_probs

    rm_dir = ctx.path("reward-train/model")
    items = reward_items(limited(read_jsonl(ctx.path("pairs/wrong.jsonl")), ctx.recipe.data.limit, "scoring"))
    loaded: list = []

    def work(k: int, idx: range) -> list[list[dict]]:
        if not loaded:
            tok = load_tokenizer(replace(ctx.recipe.model, tokenizer=rm_dir, path=rm_dir))
            # fp32 on any device: keep-probabilities become token weights, bf16 would quantise them
            loaded.extend([AutoModelForCausalLM.from_pretrained(rm_dir, dtype=torch.float32).to(device_and_dtype()[0]),
                           tok])
        sub = [items[i] for i in idx]
        probs = keep_probs(loaded[0], loaded[1], sub, ctx.recipe.data.template, batch_size=len(sub))
        return [[{"prompt": it["prompt"], "rejected": it["wrong"], "keep_probs": p}] for it, p in zip(sub, probs)]

    rows = run_sharded(ctx.sync, "reward-score", ctx.shards("reward-score"), units_of(len(items), 32), work)
    loaded.clear()
    if rows is None:
        return None
    write_jsonl(ctx.dir("reward-score") / "forget.jsonl", rows)
    flat = [x for row in rows for x in row["keep_probs"]]
    weights = token_weights(torch.tensor(flat, dtype=torch.float32), ctx.recipe.forget.token_weight).tolist()
    shares = check_flagged(flat, weights, ctx.recipe.guards)
    return {"responses": len(rows), "tokens": len(flat), "unaligned_fraction": shares["flagged_share"],
            "forget_weighted_fraction": shares["weighted_share"]}


def _text(x, role: str = "assistant") -> str:
    """A string field as is; chat messages as the content of the last message with `role`."""
    if isinstance(x, str):
        return x
    return next((m["content"] for m in reversed(x) if m.get("role") == role), x[-1]["content"])
