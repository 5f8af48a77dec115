"""Building tokenizers and causal LMs, and writing them back as Hugging Face safetensors directories.

Models come from ``from_pretrained`` (hub id or local dir; ``trust_remote_code`` only when the recipe says
so) or, for the tiny recipe and the tests, from a random-init ``LlamaConfig``. ``train_tokenizer`` builds a
byte-level BPE tokenizer from local text in well under a second, so nothing ever needs a model hub offline.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch._dynamo  # noqa: F401  imported before deepspeed.zero.Init patches tensor creation, which breaks it
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from allo.config import ModelConfig
from allo.io import honour_umask

log = logging.getLogger(__name__)
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Any:
    """Byte-level BPE trained on `texts`, saved as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.path
    if source is None:
        raise ValueError("model.tokenizer or model.path must name a tokenizer")
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:  # padding is masked out everywhere, so EOS is a safe pad
        tok.pad_token = tok.eos_token
    return tok


def build_model(cfg: ModelConfig, tokenizer: Any, path: Optional[str] = None, seed: int = 0,
                train_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Load `path` (default cfg.path), or build a random-init Llama from `cfg.init` when there is no path.
    `train_dtype`: the dtype the weights train in when it differs from the recipe's (fp32 under autocast); the
    weights are first made in the recipe's dtype, so both start from the same values."""
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    path = path or cfg.path
    if path is not None:
        model = _from_pretrained(path, cfg, dtype)
    else:
        if cfg.init is None:
            raise ValueError("model.path is empty and model.init is not set: nothing to build")
        config = LlamaConfig(**{"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                                **cfg.init})
        config._attn_implementation = cfg.attn_implementation
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    if train_dtype is not None and train_dtype != dtype:
        model.to(train_dtype)
    model.config.use_cache = False
    return model


def _from_pretrained(path: str, cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The checkpoint with model.attn_implementation; where that is the default (sdpa) and the architecture does
    not support it in the installed transformers (Gemma2), with eager attention instead, said in the log. Any other
    refused choice stops with the key that set it."""
    def load(attn: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                                    attn_implementation=attn)

    try:
        return load(cfg.attn_implementation)
    except (ValueError, ImportError) as e:
        if "attention" not in str(e).lower() and "attn" not in str(e).lower():
            raise
        why = str(e).split(". ")[0]
        if cfg.attn_implementation != "sdpa":
            raise ValueError(f"model.attn_implementation: {cfg.attn_implementation} cannot load {path} ({why}); "
                             "set model.attn_implementation to sdpa or eager") from None
        import transformers

        log.warning("model.attn_implementation: sdpa is not available for %s with transformers %s (%s); using eager "
                    "(set model.attn_implementation to choose another)", path, transformers.__version__, why)
        return load("eager")


def save_pretrained(module: torch.nn.Module, state: dict, tokenizer: Any, out_dir: str | Path,
                    dtype: Optional[torch.dtype] = None) -> None:
    """Write a HF model directory atomically (temp dir + rename); checks the state covers every parameter. `dtype`:
    the floating dtype to write in place of the weights' own (a tensor at a time, so no second copy of the model
    exists on the device), named in config.json too."""
    out_dir = Path(out_dir)
    names = {n for n, _ in module.named_parameters()}
    missing = sorted(names - set(state))
    if missing:
        raise RuntimeError(f"export: gathered weights miss {len(missing)} parameters, e.g. {missing[:3]}")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    on_host = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}
    module.save_pretrained(str(tmp), state_dict=on_host, safe_serialization=True)
    if dtype is not None:  # transformers writes the module's own dtype there
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    honour_umask(tmp)  # safetensors writes 0600
    old = out_dir.with_name(f".{out_dir.name}.old")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
