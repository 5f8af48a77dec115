"""Generation backends: the choice between vLLM and Hugging Face, one tokenisation for both (exactly one BOS),
and what the vLLM path hands to the engine (a recording stand-in for `vllm`: the engine itself needs a GPU or
the separate CPU build, see README)."""
from __future__ import annotations

import sys
import types

import pytest

import allo.generate as g
from allo.config import GenerationConfig
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


class FakeLLM:
    """A recording stand-in for vllm.LLM."""
    made: list = []
    shut: list = []

    def __init__(self, **kw):
        self.kw = kw
        FakeLLM.made.append(kw)
        self.llm_engine = types.SimpleNamespace(shutdown=lambda: FakeLLM.shut.append(kw["model"]))

    def get_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.kw["model"])

    def generate(self, requests, params):
        FakeLLM.seen.append((requests, params))
        ids = self.get_tokenizer()("4 apples. STOP here", add_special_tokens=False)["input_ids"]
        out = types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids)] * params.n)
        return [out for _ in requests]


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeLLM.made, FakeLLM.shut, FakeLLM.seen = [], [], []
    fake = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("ALLO_GENERATE_BACKEND", "vllm")
    monkeypatch.setattr(g, "_ENGINE", {})
    return FakeLLM


def test_vllm_path_sends_the_hf_token_ids(tiny_model, fake_vllm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    prompts = ["Tom has 3 apples.", tok.bos_token + "How many?"]
    s = g.Sampling(n=2, temperature=0.7, top_p=0.9, max_new_tokens=16, stop=("STOP",), seed=3)
    cfg = GenerationConfig(tensor_parallel=2, dtype="bfloat16", gpu_memory_utilization=0.5, max_model_len=2048)
    out = g.generate(str(tiny_model), prompts, s, cfg)
    g.generate(str(tiny_model), prompts, s, cfg)
    assert len(fake_vllm.made) == 1  # one engine per model, reused within a step
    assert fake_vllm.made[0] == {"model": str(tiny_model), "seed": 3, "dtype": "bfloat16", "tensor_parallel_size": 2,
                                 "gpu_memory_utilization": 0.5, "max_model_len": 2048,
                                 "enforce_eager": False}  # the recipe's settings
    requests, params = fake_vllm.seen[0]
    assert [r["prompt_token_ids"] for r in requests] == [encode_prompt(tok, p) for p in prompts]
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.seed) == (2, 0.7, 0.9, 16, 3)
    assert out == [["4 apples. "] * 2] * 2  # stop strings cut, n per prompt


def test_engines_are_shut_down_between_models_and_steps(tiny_model, fake_vllm, tmp_path):
    """Another model shuts the live engine down first; the scheduler releases the engine after every step, so the
    next (training) step starts with the GPU memory back."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    s = g.Sampling(max_new_tokens=4)
    g.generate(str(tiny_model), ["a"], s)
    assert fake_vllm.shut == []
    g.generate(str(other), ["a"], s)
    assert fake_vllm.shut == [str(tiny_model)] and len(g._ENGINE) == 1
    from allo.config import load_recipe
    from allo.pipeline import Pipeline

    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"prompt": "1 + 1?", "answer": "2"}\n')
    recipe = load_recipe(None, [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model}",
                                f"task.problems={problems}", "sample.n=1", "sample.max_new_tokens=4"])
    Pipeline(recipe).run(only="sample")
    assert fake_vllm.shut == [str(tiny_model), str(other), str(tiny_model)] and g._ENGINE == {}


def test_an_unfinished_sample_step_resumes_only_with_the_same_settings(tiny_model, fake_vllm, tmp_path):
    """Finished units of an interrupted attempt sit in a folder named by the step's fingerprint: a rerun with other
    settings starts afresh, a rerun with the same ones takes them over."""
    import json

    from allo.config import load_recipe
    from allo.pipeline import Pipeline

    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"prompt": "1 + 1?", "answer": "2"}\n')
    sets = [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model}", f"task.problems={problems}", "sample.n=1",
            "sample.max_new_tokens=4"]
    old, new = load_recipe(None, sets), load_recipe(None, sets + ["sample.temperature=0.9"])
    stale = {"prompt": "1 + 1?", "response": "STALE", "answer": "2", "correct": False}
    for recipe, expect in ((new, "4 apples. STOP here"), (old, "STALE")):  # other settings: generated; same: reused
        pipe = Pipeline(old)
        shard = pipe.ctx.dir("sample") / "shards" / pipe.fingerprint("sample") / "rank0-of-1.jsonl"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_text(json.dumps({"i": 0, "rows": [stale]}) + "\n")
        Pipeline(recipe).run(only="sample")
        rows = [json.loads(x) for x in (tmp_path / "run" / "sample" / "samples.jsonl").read_text().splitlines()]
        assert [r["response"] for r in rows] == [expect]
