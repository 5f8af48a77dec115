"""Tiny models, tokenizers and preference data built locally in a second (no model hub), for tests and benches."""
from __future__ import annotations

import json
import random
from pathlib import Path

CORPUS = [
    "The answer is {n}.", "Tom has {a} apples and buys {b} more.", "How many apples does Tom have now?",
    "{a} plus {b} is {n}.", "Let's think step by step.", "### Instruction:", "### Response:",
]


def texts(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.append(" ".join(t.format(a=a, b=b, n=a + b) for t in rng.sample(CORPUS, 4)))
    return out


def make_tokenizer(out_dir: Path, vocab_size: int = 320):
    from allo.model import train_tokenizer

    return train_tokenizer(texts(), vocab_size, out_dir)


# Odd sizes on purpose: no tensor's numel divides evenly by 2 ranks' partitions of every kind.
TINY_LLAMA = dict(hidden_size=36, intermediate_size=74, num_hidden_layers=2, num_attention_heads=3,
                  num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False)


def make_model_dir(out_dir: Path, seed: int = 0) -> Path:
    """A random-init tiny Llama plus tokenizer saved as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **TINY_LLAMA)
    LlamaForCausalLM(cfg).save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def write_pairs(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            wrong = a + b + rng.choice([-2, -1, 1, 3])
            f.write(json.dumps({"prompt": f"Tom has {a} apples and buys {b} more. How many?",
                                "chosen": f" {a} plus {b} is {a + b}. The answer is {a + b}.",
                                "rejected": f" {a} plus {b} is {wrong}. The answer is {wrong}."}) + "\n")
    return path
