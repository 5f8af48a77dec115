"""Generation backends: the choice between vLLM and Hugging Face, one tokenisation for both (exactly one BOS),
and what the vLLM path hands to the engine (a recording stand-in for `vllm`: the engine itself needs a GPU or
the separate CPU build, see README)."""
from __future__ import annotations

import sys
import types

import pytest

import allo.generate as g
from allo.data.tokenize import encode_prompt


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("ALLO_GENERATE_BACKEND", "hf")
    assert g.backend() == "hf"
    monkeypatch.setenv("ALLO_GENERATE_BACKEND", "vllm")
    assert g.backend() == "vllm"
    monkeypatch.setenv("ALLO_GENERATE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="ALLO_GENERATE_BACKEND='gpu'"):
        g.backend()
    monkeypatch.delenv("ALLO_GENERATE_BACKEND")
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    assert g.backend() == "hf"


def test_prompt_ids_have_exactly_one_bos(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    plain = encode_prompt(tok, "Tom has 3 apples.")
    with_bos_text = encode_prompt(tok, tok.bos_token + "Tom has 3 apples.")
    assert plain[0] == tok.bos_token_id and plain.count(tok.bos_token_id) == 1
    assert with_bos_text == plain


def test_vllm_path_sends_the_hf_token_ids(tiny_model, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    made, seen = [], []

    class LLM:
        def __init__(self, **kw):
            made.append(kw)

        def get_tokenizer(self):
            return tok

        def generate(self, requests, params):
            seen.append((requests, params))
            out = types.SimpleNamespace(outputs=[types.SimpleNamespace(text="4 apples. STOP here")] * params.n)
            return [out for _ in requests]

    fake = types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("ALLO_GENERATE_BACKEND", "vllm")
    monkeypatch.setattr(g, "_ENGINES", {})
    prompts = ["Tom has 3 apples.", tok.bos_token + "How many?"]
    s = g.Sampling(n=2, temperature=0.7, top_p=0.9, max_new_tokens=16, stop=("STOP",), seed=3)
    out = g.generate(str(tiny_model), prompts, s)
    g.generate(str(tiny_model), prompts, s)
    assert len(made) == 1 and made[0]["model"] == str(tiny_model)  # one engine per model, reused
    requests, params = seen[0]
    assert [r["prompt_token_ids"] for r in requests] == [encode_prompt(tok, p) for p in prompts]
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.seed) == (2, 0.7, 0.9, 16, 3)
    assert out == [["4 apples. "] * 2] * 2  # stop strings cut, n per prompt
