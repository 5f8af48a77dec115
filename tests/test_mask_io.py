"""The mask file format: bit-packed safetensors written by MaskWriter, read whole or by flat range, and plain
BOOL safetensors (older files, other tools) read the same way."""
import json

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from allo.masks.io import MaskFile, MaskWriter, load_masks, mask_counts, mask_shapes, read_metadata, save_masks

SHAPES = {"a.weight": (5, 7), "b.bias": (13,), "c.scalar": (), "d.empty": (0, 3), "e.weight": (64,)}


def random_masks(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) < 0.4 for n, s in SHAPES.items()}


def test_round_trip_and_size(tmp_path):
    masks = random_masks()
    path = tmp_path / "m.safetensors"
    save_masks(path, masks, {"ratio": 10, "counts": {n: int(m.sum()) for n, m in masks.items()}})
    got = load_masks(path)
    assert list(got) == list(SHAPES)
    assert all(got[n].dtype == torch.bool and torch.equal(got[n], masks[n]) for n in SHAPES)
    assert mask_shapes(path) == SHAPES
    assert read_metadata(path) == {"ratio": 10, "counts": {n: int(m.sum()) for n, m in masks.items()}}
    with safe_open(str(path), framework="pt") as f:  # really packed: ceil(n / 8) bytes per tensor
        assert {k: f.get_slice(k).get_shape() for k in f.keys()} == {"a.weight": [5], "b.bias": [2], "c.scalar": [1],
                                                                      "d.empty": [0], "e.weight": [8]}


def test_ranges_at_every_bit_offset(tmp_path):
    """Each ZeRO rank reads [start, start + numel) of a flattened mask; the range may start and end mid-byte and
    run past the tensor's end (partition padding, which reads as False)."""
    masks = random_masks(1)
    save_masks(tmp_path / "m.safetensors", masks, {})
    flat = masks["a.weight"].reshape(-1)
    with MaskFile(tmp_path / "m.safetensors") as f:
        for start in range(0, 36):
            for numel in (1, 3, 8, 9, 17, 40):
                want = torch.zeros(numel, dtype=torch.bool)
                part = flat[start:start + numel]
                want[:len(part)] = part
                assert torch.equal(f.range("a.weight", start, numel), want), (start, numel)
        assert torch.equal(f.range("c.scalar", 0, 4), torch.tensor([bool(masks["c.scalar"]), False, False, False]))


def test_plain_bool_files_are_read_too(tmp_path):
    masks = random_masks(2)
    path = tmp_path / "old.safetensors"
    save_file({n: m.contiguous() for n, m in masks.items()}, str(path), metadata={"ratio": json.dumps(5)})
    assert mask_shapes(path) == SHAPES and read_metadata(path) == {"ratio": 5}
    got = load_masks(path)
    assert all(torch.equal(got[n], masks[n]) for n in SHAPES)
    with MaskFile(path) as f:
        assert torch.equal(f.range("a.weight", 3, 40)[:32], masks["a.weight"].reshape(-1)[3:])
    assert mask_counts(path) == {n: int(m.sum()) for n, m in masks.items()}


def test_streamed_chunks_and_patches(tmp_path):
    """locate writes each tensor in chunks, then sets and clears single bits of the resolved threshold bins."""
    want = random_masks(3)
    w = MaskWriter(tmp_path / "m.safetensors", list(SHAPES.items()))
    for n, m in want.items():
        flat = m.reshape(-1)
        for off in range(0, flat.numel(), 16):
            w.write(n, flat[off:off + 16], off)
    flat = want["a.weight"].reshape(-1)
    on, off = torch.tensor([0, 9, 10, 34]), torch.tensor([1, 2, 17, 33])
    w.patch("a.weight", on, True)
    w.patch("a.weight", off, False)
    w.close()
    flat[on], flat[off] = True, False
    got = load_masks(tmp_path / "m.safetensors")
    assert all(torch.equal(got[n], want[n]) for n in SHAPES)
    assert not list(tmp_path.glob(".*.tmp"))
    assert np.count_nonzero(got["a.weight"].numpy()) == int(want["a.weight"].sum())


def test_first_set_bits_keeps_the_lowest_indices():
    """Ties at an exact threshold key go to the lowest flat indices; on packed masks that is first_set_bits."""
    from allo.masks.io import first_set_bits, pack_bits, unpack_bits

    g = torch.Generator().manual_seed(4)
    for n in (1, 7, 8, 9, 64, 203):
        mask = torch.rand(n, generator=g) < 0.5
        on = torch.nonzero(mask).flatten()
        for k in (0, 1, 2, 5, len(on) - 1, len(on), len(on) + 3):
            want = torch.zeros(n, dtype=torch.bool)
            want[on[:max(k, 0)]] = True
            got = unpack_bits(first_set_bits(pack_bits(mask), k), 0, n)
            assert torch.equal(got, want), (n, k)
