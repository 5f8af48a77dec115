"""The token reward model (docs/method.md §2): a small LM, sharing the policy's tokenizer, that rewrites wrong
responses.

Training data (`reward_data`): prompt = `rewrite_prompt(problem, reference, wrong)`, response = the teacher's
minimum-edit rewrite; correct responses are mixed in copied unchanged so the model learns to keep good tokens.
Training itself is the shared SFT stage (`allo sft --data reward.jsonl`).

Scoring (`keep_probs`): p_ij = P_RM(y_ij | rewrite prompt, y_i,<j), the teacher-forced probability that the
rewriter keeps token j of the wrong response, EOS included. The wrong response is tokenised exactly as the
policy's training does (`encode_response` on the template's response text), so p_ij belongs to the same token
the forget loss weights: position t of the policy batch and position t of the scoring batch carry the same id
(no off-by-one: the probability of token t comes from the logits at t-1, BOS included in the prompt).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from allo.data.tokenize import IGNORE, encode_prompt, encode_response
from allo.data.templates import render
from allo.logprobs import token_logps

INSTRUCTION = ("### Instruction:\nRewrite the wrong solution into a correct one, changing as few words as "
               "possible.\n\nProblem: {problem}\n\nReference solution: {reference}\n\nWrong solution: {wrong}"
               "\n\n### Rewrite:")


def rewrite_prompt(problem: str, reference: str, wrong: str) -> str:
    return INSTRUCTION.format(problem=problem, reference=reference.strip(), wrong=wrong.strip())


def reward_data(items: Sequence[dict], rewrites: Sequence[Optional[str]], is_right) -> tuple[list[dict], dict]:
    """SFT records for the reward model from {prompt, wrong, reference, answer} items and the teacher's rewrites.

    A rewrite is kept only when `is_right(rewrite, answer)`; None (the teacher failed) is counted and dropped.
    Each kept item also adds the reference copied unchanged (the "keep" examples).
    """
    out, counts = [], {"items": len(items), "kept": 0, "rewrite_wrong": 0, "teacher_failed": 0}
    for it, fixed in zip(items, rewrites, strict=True):
        if fixed is None:
            counts["teacher_failed"] += 1
            continue
        if not is_right(fixed, it["answer"]):
            counts["rewrite_wrong"] += 1
            continue
        counts["kept"] += 1
        out.append({"prompt": rewrite_prompt(it["prompt"], it["reference"], it["wrong"]), "response": fixed})
        out.append({"prompt": rewrite_prompt(it["prompt"], it["reference"], it["reference"]),
                    "response": it["reference"]})
    return out, counts


@torch.no_grad()
def keep_probs(model: Any, tokenizer: Any, items: Sequence[dict], template: str, batch_size: int = 32) -> list[list[float]]:
    """Per-token keep-probabilities of each item's wrong response {prompt, wrong, reference}, aligned with the
    policy's tokenisation of that response under `template`."""
    model.eval()
    out: list[list[float]] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        rows = []
        for it in chunk:
            response_text = render(it["prompt"], it["wrong"], template, tokenizer)[1]
            p = encode_prompt(tokenizer, rewrite_prompt(it["prompt"], it["reference"], it["wrong"]))
            rows.append((p, encode_response(tokenizer, response_text)))
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE)
        attn = torch.zeros_like(ids)
        for j, (p, r) in enumerate(rows):
            ids[j, :len(p) + len(r)] = torch.tensor(p + r)
            labels[j, len(p):len(p) + len(r)] = torch.tensor(r)
            attn[j, :len(p) + len(r)] = 1
        dev = next(model.parameters()).device
        logps = token_logps(model(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits.float(),
                            labels.to(dev)).cpu()
        for j, (p, r) in enumerate(rows):
            out.append(logps[j, len(p):len(p) + len(r)].exp().tolist())
    return out
