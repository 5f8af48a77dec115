"""Locate ranks the fp32 drift of a bf16 run (docs/method.md §1): a bf16 tiny model warmed up at docs/method.md's lr 1e-6 on 2 ranks
under ZeRO-3. The masks the run computes from its partitions equal the exact top-k of its fp32 master weights'
drift (written by `locate.export_fp32`); the two bf16 files tie at the threshold, and offline locate says so."""
from __future__ import annotations

import logging

import pytest
import torch

from allo.masks.io import load_masks
from allo.masks.locate import locate
from conftest import torchrun, write_recipe

pytestmark = pytest.mark.slow


def test_bf16_warmup_masks_rank_the_fp32_drift(tmp_path, tiny_model, pairs_file, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = tmp_path / "sft_bf16"  # the SFT export of a bf16 run: what the warm-up starts from
    AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.bfloat16).save_pretrained(str(sft))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(sft))
    recipe = write_recipe(tmp_path / "r.yaml", sft, pairs_file, tmp_path / "run", extra=(
        "locate: {from_partitions: true, export_fp32: true, forget_ratio: 5, improve_ratio: 10}\n"
        "warmup: {train: {lr: 1.0e-6, global_batch_size: 8, epochs: 2}}"))
    recipe.write_text(recipe.read_text().replace("dtype: fp32", "dtype: bf16"))
    torchrun(["warmup", str(recipe)])
    out = tmp_path / "run" / "warmup"
    fp32 = out / "model_fp32"
    with caplog.at_level(logging.WARNING, logger="allo.masks.select"):
        exact = locate(sft, fp32, 1e-6, {"n1": 5, "n2": 10}, tmp_path / "exact")
    assert "tie at the threshold" not in caplog.text  # the fp32 drift ranks cleanly
    for label in ("n1", "n2"):
        got, want = load_masks(out / "masks" / f"{label}.safetensors"), load_masks(exact.paths[label])
        assert set(got) == set(want)
        assert all(torch.equal(got[n], want[n]) for n in want), label
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="allo.masks.select"):
        rounded = locate(sft, out / "model", 1e-6, {"n1": 5, "n2": 10}, tmp_path / "bf16")
    assert "tie at the threshold" in caplog.text and "locate.from_partitions: true" in caplog.text
    a, b = load_masks(rounded.paths["n2"]), load_masks(exact.paths["n2"])
    overlap = sum(int((a[n] & b[n]).sum()) for n in b) / sum(int(b[n].sum()) for n in b)
    print(f"bf16-file N2 mask shares {overlap:.1%} of the fp32-drift N2 mask")
    assert overlap < 0.9
