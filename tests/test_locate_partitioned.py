"""Locating from a ZeRO-3 run's partitions (2 ranks, collectives) gives exactly the masks of the offline locate
on the merged checkpoints: global scope, and per-layer scope with a band through the exact big-bin path."""
from __future__ import annotations

import json

import pytest
import torch

from allo.masks.io import load_masks
from allo.masks.locate import locate
from conftest import torchrun, write_recipe

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("extra,env,offline", [
    ("locate: {from_partitions: true, forget_ratio: 10, improve_ratio: 15}", {}, {}),
    ("locate: {from_partitions: true, forget_ratio: 12, improve_ratio: 20, scope: per_layer, band_start: 3, "
     "collect_cap: 0}", {}, {"scope": "per_layer", "band_start": 3, "collect_cap": 0}),
])
def test_zero3_partition_locate_matches_offline(tmp_path, tiny_model, pairs_file, extra, env, offline):
    from conftest import ENV

    check_partition_locate(tmp_path, tiny_model, pairs_file, extra, dict(ENV, **env), offline)


def check_partition_locate(tmp_path, tiny_model, pairs_file, extra, env, offline, nproc: int = 2) -> None:
    """The warm-up's masks from its ZeRO-3 partitions equal the offline locate's, element for element."""
    import os

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, pairs_file, tmp_path / "run",
                          extra=extra + "\nwarmup: {train: {lr: 1.0e-3}}")
    torchrun(["warmup", str(recipe)], env=env, nproc=nproc)
    out = tmp_path / "run" / "warmup"
    meta = json.loads((out / "masks" / "n1.json").read_text())
    assert meta["from_partitions"] is True
    n1, n2 = (12, 20) if "per_layer" in extra else (10, 15)
    ref = locate(tiny_model, out / "model", 1e-3, {"n1": n1, "n2": n2}, tmp_path / "offline", **offline)
    for label in ("n1", "n2"):
        got, want = load_masks(out / "masks" / f"{label}.safetensors"), load_masks(ref.paths[label])
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), f"{label} {name}"
        assert json.loads((out / "masks" / f"{label}.json").read_text())["counts"] == \
            json.loads((tmp_path / "offline" / f"{label}.json").read_text())["counts"]
    assert os.path.exists(out / "model" / "model.safetensors")
