"""Any causal LM a user brings: tiny random-init models of the families users fine-tune most, through `allo improve`
under ZeRO-3 on 2 ranks with a neuron mask. Every masked-out element stays bit-identical, the saved model loads
back whole (no missing or unexpected tensor), a family whose default attention transformers refuses (Gemma2: no
sdpa) trains with eager attention and says so, and a mask is accepted under either name of a tensor that
transformers renames on load (GPT-NeoX: embed_out.weight in the file, lm_head.weight in the module)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from allo.masks.io import MaskError, check_against_model, match_names, save_masks
from conftest import torchrun, write_recipe

SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)


def family(name: str, vocab: int, tok) -> torch.nn.Module:
    import transformers as t

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids))
    if name == "gpt_neox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(vocab_size=vocab, tie_word_embeddings=False, **SIZE, **ids))
    config, model = {"mistral": (t.MistralConfig, t.MistralForCausalLM), "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
                     "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM), "phi3": (t.Phi3Config, t.Phi3ForCausalLM)}[name]
    extra = {"head_dim": 8} if name == "gemma2" else {}
    return model(config(vocab_size=vocab, num_key_value_heads=2, **SIZE, **extra, **ids))


def make(tmp_path, name):
    from tiny import make_tokenizer

    d = tmp_path / name
    tok = make_tokenizer(d)
    torch.manual_seed(0)
    family(name, len(tok), tok).save_pretrained(str(d))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma2", "gpt_neox", "phi3", "gpt2"])
def test_family_holds_its_mask_under_zero3(tmp_path, pairs_file, name):
    from transformers import AutoModelForCausalLM

    d = make(tmp_path, name)
    start = load_file(str(d / "model.safetensors"))  # the names the checkpoint file gives
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(w.shape, generator=g) < 0.2 for n, w in start.items()}
    mask = tmp_path / "n2.safetensors"
    save_masks(mask, masks, {"counts": {n: int(m.sum()) for n, m in masks.items()}, "ratio": 20})
    recipe = write_recipe(tmp_path / "r.yaml", d, pairs_file, tmp_path / "run", "improve: {train: {lr: 0.01}}")
    proc = torchrun(["improve", str(recipe), "--mask", str(mask), "--set", "train.max_steps=2"])
    out = tmp_path / "run" / "improve" / "model"
    if name == "gemma2":
        assert "sdpa is not available" in proc.stderr and "using eager" in proc.stderr
    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    end = load_file(str(out / "model.safetensors"))
    assert set(end) == set(start)
    moved = 0
    for n, m in masks.items():
        assert torch.equal(start[n][~m], end[n][~m]), f"{name} {n}: masked-out elements moved"
        moved += int((start[n][m] != end[n][m]).sum())
    assert moved > 0
    assert json.loads((tmp_path / "run" / "improve" / "manifest.json").read_text())["zero_stage"] == 3


def test_a_mask_fits_under_the_files_name_or_the_modules(tmp_path):
    """GPT-NeoX: offline `allo locate` reads the file (embed_out.weight), a mask from the warm-up run's partitions
    names the module's parameter (lm_head.weight); each fits the model, and the pre-flight accepts both against
    the checkpoint. A tensor of another shape is still refused."""
    from allo.masks.locate import locate
    from allo.preflight import check_mask

    d = make(tmp_path, "gpt_neox")
    from transformers import AutoModelForCausalLM

    params = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_pretrained(str(d)).named_parameters()}
    file_names = {n: tuple(w.shape) for n, w in load_file(str(d / "model.safetensors")).items()}
    assert "lm_head.weight" in params and "embed_out.weight" in file_names
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    weights = load_file(str(d / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({n: w + 1e-3 * torch.randn_like(w) for n, w in weights.items()}, str(tuned / "model.safetensors"))
    res = locate(d, tuned, 1e-3, {"n1": 10}, tmp_path / "masks")
    found = check_against_model(res.paths["n1"], params)  # the file's names fit the module
    assert found["lm_head.weight"] == "embed_out.weight"
    module_named = {n: torch.zeros(s, dtype=torch.bool) for n, s in params.items()}
    save_masks(tmp_path / "m.safetensors", module_named, {"counts": {n: 0 for n in params}})
    check_mask(str(tmp_path / "m.safetensors"), d)  # the module's names fit the checkpoint
    assert match_names({"a.weight": (2, 3)}, {"b.weight": (2, 3)}) == ({"b.weight": "a.weight"}, [])
    with pytest.raises(MaskError, match="masks name no model parameter: a.weight"):
        save_masks(tmp_path / "x.safetensors", {"a.weight": torch.zeros(3, 2, dtype=torch.bool)}, {})
        check_against_model(tmp_path / "x.safetensors", {"b.weight": (2, 3)})
