"""Generation backends: vLLM when it is installed and a GPU is present, else batched Hugging Face generate.

Both take rendered prompt strings and return, per prompt, `n` completions (text only, stop strings cut). Both
see the same token ids: the prompt is tokenised by `encode_prompt`, the training code's own, with exactly one
BOS, so a template that already renders BOS text does not end up with two. How to generate (backend, batch
size, the vLLM engine's settings) is the recipe's `generation` section; what to sample is `Sampling`.

A vLLM engine reserves most of the GPU while it lives. One engine is kept at a time (asking for another model
shuts the previous one down) and `release()`, which the scheduler calls after every step, shuts it down, so a
training step that follows gets the memory back.
"""
from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from allo.config import GenerationConfig
from allo.data.tokenize import encode_prompt

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


def backend(cfg: Optional[GenerationConfig] = None) -> str:
    """'vllm' or 'hf': ALLO_GENERATE_BACKEND if set, else `cfg.backend`, where auto means vLLM when it imports and
    a GPU is present."""
    forced = os.environ.get("ALLO_GENERATE_BACKEND") or (cfg or GenerationConfig()).backend
    if forced not in ("auto", "hf", "vllm"):
        raise ValueError(f"ALLO_GENERATE_BACKEND={forced!r}: expected auto, hf or vllm")
    if forced != "auto":
        return forced
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "hf"
    return "vllm" if torch.cuda.is_available() else "hf"


def vllm_available(cfg: Optional[GenerationConfig] = None) -> bool:
    return backend(cfg) == "vllm"


def generate(model_dir: str, prompts: Sequence[str], sampling: Sampling, cfg: Optional[GenerationConfig] = None,
             model: Any = None, tokenizer: Any = None, progress: bool = True) -> list[list[str]]:
    """`n` completions per prompt. Pass `model`/`tokenizer` to reuse loaded ones (HF backend)."""
    cfg = cfg or GenerationConfig()
    if model is None and vllm_available(cfg):
        return _generate_vllm(model_dir, prompts, sampling, cfg, tokenizer)
    return _generate_hf(model_dir, prompts, sampling, cfg.batch_size, model, tokenizer, progress)


def load_generator(model_dir: str, cfg: Optional[GenerationConfig] = None) -> tuple[Any, Any]:
    """(model, tokenizer) to pass to many `generate` calls: the Hugging Face model loaded once on this rank's
    device, or (None, tokenizer) when vLLM generates (its engine is kept between calls anyway)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if vllm_available(cfg):
        return None, tokenizer
    device, dtype = device_and_dtype()
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device), tokenizer


_ENGINE: dict[tuple, Any] = {}  # at most one live vLLM engine: (model, settings) -> LLM


def _engine(model_dir: str, cfg: GenerationConfig, seed: int) -> Any:
    from vllm import LLM

    key = (model_dir, cfg.tensor_parallel, cfg.dtype, cfg.gpu_memory_utilization, cfg.max_model_len,
           cfg.enforce_eager, seed)
    if key not in _ENGINE:
        release()
        _ENGINE[key] = LLM(model=model_dir, seed=seed, dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel,
                           gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
                           enforce_eager=cfg.enforce_eager)
    return _ENGINE[key]


def release() -> None:
    """Shut the live vLLM engine down and hand its GPU memory back (a no-op when there is none)."""
    while _ENGINE:
        _, llm = _ENGINE.popitem()
        shutdown = getattr(getattr(llm, "llm_engine", None), "shutdown", None) or getattr(llm, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
        log.info("vLLM engine shut down; GPU memory released")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _generate_vllm(model_dir: str, prompts: Sequence[str], s: Sampling, cfg: GenerationConfig,
                   tokenizer: Any) -> list[list[str]]:
    from vllm import SamplingParams

    llm = _engine(model_dir, cfg, s.seed)
    tokenizer = tokenizer or llm.get_tokenizer()
    params = SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                            stop=list(s.stop) or None, seed=s.seed)
    requests = [{"prompt_token_ids": encode_prompt(tokenizer, p)} for p in prompts]
    # decoded here, as the Hugging Face path decodes: vLLM's own text holds back a trailing incomplete UTF-8
    # sequence, so the two backends would hand the same tokens on as different strings
    return [[_cut(tokenizer.decode(o.token_ids, skip_special_tokens=True), s.stop) for o in out.outputs]
            for out in llm.generate(requests, params)]


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def _generate_hf(model_dir: str, prompts: Sequence[str], s: Sampling, batch_size: int, model: Any,
                 tokenizer: Any, progress: bool) -> list[list[str]]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    if model is None:
        device, dtype = device_and_dtype()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(s.seed)
    outputs: list[list[str]] = []
    jobs = [p for p in prompts for _ in range(s.n)]
    for i in tqdm(range(0, len(jobs), batch_size), desc="generate", disable=not progress):
        enc = [encode_prompt(tokenizer, p) for p in jobs[i:i + batch_size]]
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
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
        for row in out[:, width:]:
            outputs.append(_cut(tokenizer.decode(row, skip_special_tokens=True), s.stop))
    return [outputs[i * s.n:(i + 1) * s.n] for i in range(len(prompts))]
