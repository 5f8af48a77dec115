"""Per-token log-probs: the chunked computation equals the dense one (values and gradients), and under autograd it
keeps no float32 copy of the logits for backward (what bounds its memory at long sequences and large vocabularies)."""
from __future__ import annotations

import torch

from allo.logprobs import token_logps


def _inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 37, 101, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 101, (3, 37), generator=g)
    labels[:, :5] = -100  # prompts
    labels[2, 30:] = -100  # padding
    return logits, labels


def _saved_bytes(fn, *existing: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the storages autograd keeps for backward while `fn` runs, other than those of `existing` tensors
    (views of the logits cost nothing: the logits exist anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in existing}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(kept.values()), out


def test_chunked_equals_dense_values_and_gradients():
    for dtype in (torch.float32, torch.bfloat16):
        logits, labels = _inputs(dtype)
        dense = token_logps(logits, labels)
        (gd,) = torch.autograd.grad(dense.sum(), logits)
        for chunk in (101, 3 * 101 * 4, 3 * 101 * 7 + 5):  # one position per piece, several, ragged last piece
            part = token_logps(logits, labels, chunk=chunk)
            (gp,) = torch.autograd.grad(part.sum(), logits)
            assert torch.equal(part, dense), (dtype, chunk)
            assert torch.allclose(gp, gd, rtol=0, atol=0), (dtype, chunk)
        assert dense[:, :5].abs().sum() == 0 and dense[2, 30:].abs().sum() == 0


def test_chunked_keeps_no_float32_logits_for_backward():
    logits, labels = _inputs(torch.bfloat16)
    fp32_logits = logits.numel() * 4
    dense_bytes, _ = _saved_bytes(lambda: token_logps(logits, labels), logits, labels)
    chunked_bytes, out = _saved_bytes(lambda: token_logps(logits, labels, chunk=3 * 101 * 4), logits, labels)
    assert dense_bytes >= fp32_logits  # the upcast logits (and the softmax) are kept
    assert chunked_bytes < fp32_logits / 20, (chunked_bytes, fp32_logits)  # the valid mask and such
    out.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_reference_cache_round_trip_across_shards(tmp_path):
    """Two ranks' shards, examples interleaved and of ragged lengths: every row reads back exactly; a shard made
    for other weights or examples is not taken; writing out of order is refused."""
    import pytest

    from allo.logprobs import ReferenceWriter, open_reference_cache

    g = torch.Generator().manual_seed(0)
    lengths = {i: [3 + i % 5, 1 + (7 * i) % 4] for i in range(11)}
    rows = {i: [torch.randn(n, generator=g) for n in lengths[i]] for i in lengths}
    d = tmp_path / "ref"
    for rank in range(2):
        mine = list(range(rank, 11, 2))
        w = ReferenceWriter(d / f"rank{rank}-of-2.safetensors", "key-1", mine, [lengths[i] for i in mine])
        for i in mine:
            w.add(i, rows[i])
        w.close()
    cache = open_reference_cache(d, "key-1", 2)
    for i in lengths:
        got = cache.rows(i)
        assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, rows[i]))
    cache.close()
    assert open_reference_cache(d, "key-2", 2) is None  # other weights or examples
    assert open_reference_cache(d, "key-1", 3) is None  # another world size's shards are missing
    w = ReferenceWriter(d / "x.safetensors", "k", [0, 1], [[2], [2]])
    with pytest.raises(ValueError, match="example 1 written out of order"):
        w.add(1, [torch.zeros(2)])
