"""One rank: ZeRO partitions nothing, so `train.single_rank: fast` (the default) trains with ZeRO-0 in place of a
ZeRO-1/2/3 config without offload, and a bf16 recipe as fp32 weights under torch autocast. The choice is pure
(`single_rank_config`); end to end, on one CPU rank: the log names it, masks hold bit for bit, a bf16 recipe's
models stay bf16 on disk, fp32 training equals ZeRO-3's, and locate from the warm-up run equals the offline locate.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from allo.engine import single_rank_config
from conftest import ENV, assert_adamw_close, torchrun, write_recipe
from test_locate_partitioned import check_partition_locate
from test_masked_training import mask_file, run_improve  # noqa: F401 - mask_file is a fixture


def _cfg(stage: int, bf16: bool, offload: bool = False) -> dict:
    zero = {"stage": stage, "reduce_bucket_size": 5e7}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"train_batch_size": 8, "bf16": {"enabled": bf16}, "zero_optimization": zero}


@pytest.mark.parametrize("stage,bf16,offload,world,mode,changed,autocast", [
    (3, True, False, 1, "fast", True, True),
    (2, True, False, 1, "fast", True, True),
    (0, True, False, 1, "fast", True, True),      # DeepSpeed's bf16 ZeRO-0 keeps 20 bytes a parameter
    (3, False, False, 1, "fast", True, False),
    (0, False, False, 1, "fast", False, False),   # already what fast means
    (3, True, False, 2, "fast", False, False),    # two ranks: ZeRO partitions
    (3, True, True, 1, "fast", False, False),     # offload is a memory choice
    (3, True, False, 1, "as_configured", False, False),
])
def test_single_rank_choice(stage, bf16, offload, world, mode, changed, autocast):
    cfg = _cfg(stage, bf16, offload)
    out, why = single_rank_config(cfg, world, mode)
    assert (why is not None) == changed
    if not changed:
        assert out is cfg
        return
    assert out["zero_optimization"] == {"stage": 0} and out["train_batch_size"] == 8
    assert bool(out.get("torch_autocast", {}).get("enabled")) == autocast
    assert not out["bf16"]["enabled"]
    assert cfg["zero_optimization"]["stage"] == stage  # the recipe's config is not modified


@pytest.mark.slow
def test_one_rank_bf16_holds_masks_and_saves_bf16(tmp_path, tiny_model, pairs_file, mask_file):  # noqa: F811
    path, masks = mask_file
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "run",
                          "improve: {train: {lr: 0.01}}")
    proc = torchrun(["improve", str(recipe), "--mask", str(path), "--set", "model.dtype=bf16",
                     "--set", "train.max_steps=3"], nproc=1)
    assert "one rank: ZeRO-0 in place of ds_configs/zero3.json" in proc.stderr
    assert "bf16 as fp32 weights under autocast" in proc.stderr
    assert "stage improve: gradient checkpointing off (auto: off on the CPU)" in proc.stderr
    out = tmp_path / "run" / "improve"
    assert json.loads((out / "manifest.json").read_text())["zero_stage"] == 0
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    start, end = load_file(str(tiny_model / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    moved = selected = 0
    for name, m in masks.items():
        a, b = start[name].to(torch.bfloat16), end[name]
        assert b.dtype == torch.bfloat16, name
        assert int(((a != b) & ~m).sum()) == 0, f"{name}: masked-out elements moved"
        moved, selected = moved + int(((a != b) & m).sum()), selected + int(m.sum())
    assert moved > 0.5 * selected, f"only {moved}/{selected} selected elements moved"


@pytest.mark.slow
def test_one_rank_fp32_equals_zero3(tmp_path, tiny_model, pairs_file, mask_file):  # noqa: F811
    """The same three masked steps under ZeRO-0 (fast) and as configured (ZeRO-3): the same weights, to float
    rounding (the two sum the gradient norm in different orders)."""
    path, _ = mask_file
    fast = run_improve(tmp_path / "fast", tiny_model, pairs_file, path, "ds_configs/zero3.json", nproc=1)
    zero3 = run_improve(tmp_path / "zero3", tiny_model, pairs_file, path, "ds_configs/zero3.json", nproc=1,
                        extra_set=("--set", "train.single_rank=as_configured"))
    assert json.loads((tmp_path / "zero3" / "run" / "improve" / "manifest.json").read_text())["zero_stage"] == 3
    assert set(fast) == set(zero3)
    # The engines sum each gradient in another order (ZeRO-3's flat buffers also change the alignment, and with it
    # the matmul kernel's blocking on some CPUs): gradients differ by float32 rounding (conftest.assert_adamw_close).
    assert_adamw_close(fast, zero3, lr=0.01, steps=3)


@pytest.mark.slow
def test_one_rank_locate_from_the_run_equals_offline(tmp_path, tiny_model, pairs_file):
    check_partition_locate(tmp_path, tiny_model, pairs_file,
                           "locate: {from_partitions: true, forget_ratio: 10, improve_ratio: 15}", ENV, {}, nproc=1)
