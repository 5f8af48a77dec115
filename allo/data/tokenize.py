"""Tokenisation with prompt-masked labels, one BOS, configurable truncation, and one collator for all stages.

An example is ``{"prompt_ids", "responses": [ids, ...], "index"}`` plus optional per-response token arrays
(``token_weights``, ``ref_logps``: one float per response token). SFT, NPO and forget examples have one
response; preference examples have two (chosen, rejected).

The collator lays the response slots out slot-major (all chosen rows, then all rejected rows) so a
preference batch runs in one forward pass. Every per-token tensor it returns is aligned with
``input_ids``: entry t belongs to token t, and is 0 (or -100 for labels) outside responses.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from allo.data.records import DataError
from allo.data.templates import render

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class TruncationPolicy:
    max_length: int
    max_prompt_length: int
    keep: str = "keep_end"  # which end of a long prompt to keep


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt with exactly one BOS (added unless the rendered text already starts with it)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a response, ending with EOS (added unless the text already ends with it)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def truncate(prompt: list[int], responses: list[list[int]], policy: TruncationPolicy,
             has_bos: bool) -> tuple[list[int], list[list[int]], bool]:
    """Fit prompt+response into max_length: shorten the prompt to max_prompt_length first, then cut responses."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= policy.max_length:
        return prompt, responses, False
    if len(prompt) > policy.max_prompt_length:
        keep = policy.max_prompt_length
        if policy.keep == "keep_end":
            head = prompt[:1] if has_bos else []
            prompt = head + prompt[len(prompt) - (keep - len(head)):]
        else:
            prompt = prompt[:keep]
    room = policy.max_length - len(prompt)
    return prompt, [r[:room] for r in responses], True


def tokenize_records(records: Sequence[dict], tokenizer: Any, template: str, policy: TruncationPolicy,
                     response_fields: Sequence[str]) -> list[dict]:
    """Tokenise records into examples; logs how many were kept as is and how many truncated."""
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"data.template is 'chat' but the tokenizer {tokenizer.name_or_path or ''} has no chat "
                         "template (use template: alpaca, alpaca_cot or raw, or a tokenizer that has one)")
    counts: Counter = Counter()
    has_bos = tokenizer.bos_token_id is not None
    out = []
    for i, rec in enumerate(records):
        prompt_ids, responses = None, []
        for f in response_fields:
            try:
                p_text, r_text = render(rec["prompt"], rec[f], template, tokenizer)
            except Exception as e:  # a record the template cannot render: name it (chat templates raise anything)
                raise DataError(f"{rec.get('source', f'record {i}')}: template {template!r} cannot render it "
                                f"({type(e).__name__}: {e})") from e
            if prompt_ids is None:
                prompt_ids = encode_prompt(tokenizer, p_text)
            responses.append(encode_response(tokenizer, r_text))
        prompt_ids, responses, cut = truncate(prompt_ids, responses, policy, has_bos)
        counts["truncated" if cut else "kept"] += 1
        out.append({"prompt_ids": prompt_ids, "responses": responses, "index": i})
    log.info("tokenised %d records: %d kept whole, %d truncated (max_length %d, max_prompt_length %d)",
             len(records), counts["kept"], counts["truncated"], policy.max_length, policy.max_prompt_length)
    return out


def collate(examples: Sequence[dict], pad_id: int, token_arrays: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Pad a list of examples into slot-major tensors (see module docstring)."""
    n_slots = len(examples[0]["responses"])
    rows = [(ex, s) for s in range(n_slots) for ex in examples]
    width = max(len(ex["prompt_ids"]) + len(ex["responses"][s]) for ex, s in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    arrays = {name: torch.zeros((n, width), dtype=torch.float32) for name in token_arrays}
    for row, (ex, s) in enumerate(rows):
        p, r = ex["prompt_ids"], ex["responses"][s]
        end = len(p) + len(r)
        input_ids[row, :end] = torch.tensor(p + r)
        labels[row, len(p):end] = torch.tensor(r)
        attention[row, :end] = 1
        for name in token_arrays:
            values = ex[name][s][: len(r)]
            arrays[name][row, len(p):len(p) + len(values)] = torch.as_tensor(values, dtype=torch.float32)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
             "index": torch.tensor([ex["index"] for ex in examples]), **arrays}
    return batch


def pack(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch plus its rows as one padding-free row: every row's tokens end to end ("packed_ids",
    "packed_labels"), position ids restarting at 0 for each row (from which transformers keeps attention within a
    row: a block-diagonal causal mask for sdpa/eager, varlen kernels for flash attention) and, for each packed
    token, its place in the flattened (rows × width) layout ("packed_index"), where the log-probs go back. Built on
    the host, so that nothing on the device has to wait for a count. The row's first token (BOS, a prompt token) is
    never a label, so no row's first label is predicted from the row before it."""
    keep = batch["attention_mask"].bool()
    index = keep.flatten().nonzero().squeeze(1)
    lengths = keep.sum(1)
    ends = torch.cumsum(lengths, 0)
    starts = torch.repeat_interleave(ends - lengths, lengths)
    return {**batch, "packed_ids": batch["input_ids"].flatten()[index].unsqueeze(0),
            "packed_labels": batch["labels"].flatten()[index].unsqueeze(0),
            "packed_positions": (torch.arange(index.numel()) - starts).unsqueeze(0), "packed_index": index,
            # the row boundaries flash attention's varlen kernel takes, so that it need not derive them on the device
            "packed_cu_seq_lens": torch.cat([ends.new_zeros(1), ends]).to(torch.int32),
            "packed_max_length": int(lengths.max())}


def packing_problem(attn_implementation: str, device_type: str) -> Optional[str]:
    """Why `train.packing` is refused for this attention on this device, or None. On a GPU, sdpa and eager attention
    learn the rows' boundaries only from a block-diagonal mask over the whole packed row, which rules out the flash
    kernel and computes every score of the row: slower than padding. Flash attention takes the boundaries from
    `pack()` instead (varlen kernel). On the CPU every kernel computes the masked scores anyway."""
    if device_type == "cuda" and not attn_implementation.startswith("flash"):
        return (f"train.packing with model.attn_implementation {attn_implementation} on a GPU builds a block-diagonal "
                f"mask over each packed row, which rules out the flash kernel and computes every score of the row "
                f"(slower than padded batches); set model.attn_implementation to flash_attention_2 (pip install "
                f"flash-attn) or train.packing to false")
    return None
