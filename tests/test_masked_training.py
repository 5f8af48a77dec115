"""Neuron masks hold exactly under DeepSpeed: 2 ranks on CPU, odd tensor sizes, weight decay > 0.

After several improve steps every element outside the mask is bit-identical to the start and the selected
ones moved, for ZeRO-3 (with and without CPU offload, fp32 and bf16), ZeRO-2 (with offload), ZeRO-1 (bf16)
and ZeRO-0 (fp32 and bf16), all
with gradient accumulation (global 8 = micro 2 × accumulation 2 × world 2).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_adamw_close, torchrun, write_recipe
from allo.masks.io import save_masks

pytestmark = pytest.mark.slow


def make_mask(model_dir, ratio=0.1, seed=0):
    """Random ~10% mask; the embedding fully frozen (must get requires_grad=False) and one projection fully
    selected (not the embedding: rows of tokens absent from the data get no gradient at all)."""
    weights = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(w.shape, generator=g) < ratio for n, w in weights.items()}
    frozen, full = "model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight"
    masks[frozen] = torch.zeros_like(masks[frozen])
    masks[full] = torch.ones_like(masks[full])
    counts = {n: int(m.sum()) for n, m in masks.items()}
    return masks, counts


@pytest.fixture(scope="module")
def mask_file(tiny_model, tmp_path_factory):
    masks, counts = make_mask(tiny_model)
    path = tmp_path_factory.mktemp("mask") / "n2.safetensors"
    save_masks(path, masks, {"counts": counts, "ratio": 10})
    return path, masks


def run_improve(tmp_path, tiny_model, pairs_file, mask_path, ds_config, dtype="fp32", extra_set=(), env=None,
                nproc=2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "run",
                          "improve: {train: {lr: 0.01, global_batch_size: 8}}")
    torchrun(["improve", str(recipe), "--mask", str(mask_path), "--set", f"train.ds_config={ds_config}",
              "--set", f"model.dtype={dtype}", "--set", "train.max_steps=3", *extra_set], nproc=nproc, env=env)
    return load_file(str(tmp_path / "run" / "improve" / "model" / "model.safetensors"))


@pytest.mark.parametrize("ds_config,dtype", [
    ("ds_configs/zero3.json", "fp32"),
    ("ds_configs/zero3.json", "bf16"),
    ("ds_configs/zero3_offload.json", "fp32"),
    ("ds_configs/zero2.json", "fp32"),
    ("ds_configs/zero1.json", "bf16"),
    ("ds_configs/zero2_offload.json", "fp32"),
    ("ds_configs/zero0.json", "fp32"),
    ("ds_configs/zero0.json", "bf16"),
])
def test_frozen_elements_bit_identical(tmp_path, tiny_model, pairs_file, mask_file, ds_config, dtype):
    check_frozen(tmp_path, tiny_model, pairs_file, mask_file, ds_config, dtype)


def check_frozen(tmp_path, tiny_model, pairs_file, mask_file, ds_config, dtype, extra_set=(), env=None, nproc=2):
    """Every masked-out element bit-identical after 3 masked steps, (almost) every selected one moved."""
    path, masks = mask_file
    start = load_file(str(tiny_model / "model.safetensors"))
    end = run_improve(tmp_path, tiny_model, pairs_file, path, ds_config, dtype, extra_set, env, nproc)
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    moved = selected = 0
    for name, m in masks.items():
        a, b = start[name].to(want), end[name]
        assert b.dtype == want
        frozen_changed = int(((a != b) & ~m).sum())
        assert frozen_changed == 0, f"{name}: {frozen_changed} masked-out elements moved under {ds_config} {dtype}"
        moved += int(((a != b) & m).sum())
        selected += int(m.sum())
    # bf16 rounds some tiny updates away; fp32 moves (almost) every selected element.
    assert moved > (0.5 if dtype == "bf16" else 0.95) * selected, f"only {moved}/{selected} selected moved"


def test_sparse_state_follows_dense(tmp_path, tiny_model, pairs_file, mask_file):
    path, _ = mask_file
    dense = run_improve(tmp_path / "dense", tiny_model, pairs_file, path, "ds_configs/zero3.json")
    sparse = run_improve(tmp_path / "sparse", tiny_model, pairs_file, path, "ds_configs/zero3.json",
                         extra_set=("--set", "train.sparse_optimizer_state=true"))
    # the same arithmetic on the masked elements, stored two ways; an element's update may round differently by an
    # ulp, and the next forward then sees weights that differ by that much (conftest.assert_adamw_close)
    assert_adamw_close(sparse, dense, lr=0.01, steps=3)


def test_mask_that_does_not_fit_is_refused(tmp_path, tiny_model, pairs_file, mask_file):
    _, masks = mask_file
    bad = dict(masks)
    name = sorted(bad)[2]
    bad[name] = bad[name][..., :-1]
    bad["not.a.param"] = torch.ones(3, dtype=torch.bool)
    del bad[sorted(masks)[3]]
    save_masks(tmp_path / "bad.safetensors", bad, {})
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "run")
    proc = torchrun(["improve", str(recipe), "--mask", str(tmp_path / "bad.safetensors")], nproc=1, check=False)
    assert proc.returncode != 0
    assert "not.a.param" in proc.stderr and name in proc.stderr and sorted(masks)[3] in proc.stderr


def test_clipping_sees_the_masked_gradient_under_every_zero_stage(tmp_path, tiny_model, pairs_file, mask_file):
    """The gradient norm clipped with is the masked gradient's: equal under every ZeRO stage (each masks in its own
    place: parameter hooks, reduced partitions, offloaded partitions and their norms, local partitions; under fp32
    ZeRO-0 MaskedAdamW clips, inside its step) and
    unlike the unmasked norm. Rank 0 holds mask elements for its own partition only, shared by the optimizer and
    the gradient masker (a second copy only where ZeRO-3's offloaded optimizer and the GPU's gradients differ in
    device: tests/test_device.py)."""
    import json
    import re

    path, masks = mask_file
    ones = tmp_path / "ones.safetensors"
    save_masks(ones, {n: torch.ones_like(m) for n, m in masks.items()}, {})
    trainable = sum(m.numel() for n, m in masks.items() if m.any())

    def first_step(name, ds_config, mask):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_model, pairs_file, tmp_path / name,
                              "improve: {train: {lr: 0.01, global_batch_size: 8}}")
        proc = torchrun(["improve", str(recipe), "--mask", str(mask), "--set", f"train.ds_config={ds_config}",
                         "--set", "train.max_steps=1", "--set", "train.grad_clip=1.0e-3"])
        held = re.search(r"masks on rank 0: (\d+) elements for the optimizer \(([^)]*)\), (\d+) more", proc.stderr)
        assert held, proc.stderr[-3000:]
        norm = json.loads((tmp_path / name / "improve" / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
        return norm, int(held.group(1)), int(held.group(3))

    zero0, held, extra = first_step("zero0", "ds_configs/zero0.json", path)  # fp32 ZeRO-0: the optimizer clips
    assert (held, extra) == (trainable, 0)
    reference, _, _ = first_step("zero3", "ds_configs/zero3.json", path)
    unmasked, _, _ = first_step("ones", "ds_configs/zero3.json", ones)
    assert abs(unmasked - reference) > 0.05 * reference, "the mask changes the clipped norm"
    assert zero0 == pytest.approx(reference, rel=1e-4)
    for config in ("zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"):
        norm, held, extra = first_step(f"{config}_", f"ds_configs/{config}.json", path)
        assert norm == pytest.approx(reference, rel=1e-4), config
        assert held <= trainable // 2 + 64, (config, held, trainable)  # this rank's partition (and its padding)
        assert extra == 0, config  # on the CPU even the offloaded optimizer's mask is where the gradients are
