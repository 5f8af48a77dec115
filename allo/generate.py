"""Generation backends: vLLM when it is installed and a GPU is present, else batched Hugging Face generate.

Both take rendered prompt strings and return, per prompt, `n` completions (text only, stop strings cut).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    n: int = 1
    temperature: float = 0.0       # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int = 0


def _cut(text: str, stop: Sequence[str]) -> str:
    for s in stop:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def generate(model_dir: str, prompts: Sequence[str], sampling: Sampling, batch_size: int = 64,
             model: Any = None, tokenizer: Any = None, progress: bool = True) -> list[list[str]]:
    """`n` completions per prompt. Pass `model`/`tokenizer` to reuse loaded ones (HF backend)."""
    if model is None and vllm_available():
        return _generate_vllm(model_dir, prompts, sampling)
    return _generate_hf(model_dir, prompts, sampling, batch_size, model, tokenizer, progress)


def _generate_vllm(model_dir: str, prompts: Sequence[str], s: Sampling) -> list[list[str]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, seed=s.seed)
    params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                            stop=list(s.stop) or None, seed=s.seed)
    return [[o.text for o in out.outputs] for out in llm.generate(list(prompts), params)]


@torch.no_grad()
def _generate_hf(model_dir: str, prompts: Sequence[str], s: Sampling, batch_size: int, model: Any,
                 tokenizer: Any, progress: bool) -> list[list[str]]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(s.seed)
    outputs: list[list[str]] = []
    jobs = [p for p in prompts for _ in range(s.n)]
    for i in tqdm(range(0, len(jobs), batch_size), desc="generate", disable=not progress):
        chunk = jobs[i:i + batch_size]
        enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk]
        bos = tokenizer.bos_token_id
        enc = [([bos] if bos is not None and (not e or e[0] != bos) else []) + e for e in enc]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, e in enumerate(enc):  # left padding so every row continues from its last prompt token
            ids[j, width - len(e):] = torch.tensor(e)
            attn[j, width - len(e):] = 1
        kwargs = dict(do_sample=s.temperature > 0, max_new_tokens=s.max_new_tokens, pad_token_id=pad,
                      eos_token_id=tokenizer.eos_token_id)
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        out = model.generate(input_ids=ids, attention_mask=attn, **kwargs)
        for row in out[:, width:]:
            outputs.append(_cut(tokenizer.decode(row, skip_special_tokens=True), s.stop))
    return [outputs[i * s.n:(i + 1) * s.n] for i in range(len(prompts))]
