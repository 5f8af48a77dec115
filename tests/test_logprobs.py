"""Per-token log-probs: equal to autograd over the plain formula (values and gradients) for any piece size, keep no
float32 copy of the logits for backward (what bounds their memory at long sequences and large vocabularies), and
touch the logits a fixed number of times in backward, however many pieces."""
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


def _reference(logits, labels):
    """The plain formula under autograd: log_softmax of the float32 logits, the label's entry, 0 off responses."""
    targets = labels[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.pad(logp * (targets != -100), (1, 0))


def test_a_hand_computed_case():
    """Logits (0, ln 2, ln 3) give softmax (1/6, 2/6, 3/6); the label is token 2: log-prob ln(1/2), gradient
    onehot − softmax = (−1/6, −1/3, 1/2) at position 0 and nothing at the last position (it predicts nothing)."""
    import math

    logits = torch.tensor([[[0.0, math.log(2), math.log(3)], [5.0, -1.0, 0.5]]], requires_grad=True)
    out = token_logps(logits, torch.tensor([[-100, 2]]), chunk=3)
    torch.testing.assert_close(out, torch.tensor([[0.0, -math.log(2)]]))
    out.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[[-1 / 6, -1 / 3, 1 / 2], [0.0, 0.0, 0.0]]]))


def test_equals_autograd_on_the_plain_formula_for_every_piece_size():
    for dtype in (torch.float32, torch.bfloat16):
        logits, labels = _inputs(dtype)
        ref = _reference(logits, labels)
        (g_ref,) = torch.autograd.grad(ref.sum() + (ref * torch.arange(37.0)).sum(), logits)
        outs = []
        for chunk in (101, 3 * 101 * 4, 3 * 101 * 7 + 5, 10 ** 9):  # a position a piece, several, ragged, one piece
            out = token_logps(logits, labels, chunk=chunk)
            (g,) = torch.autograd.grad(out.sum() + (out * torch.arange(37.0)).sum(), logits)
            # the log-sum-exp in another order: a few float32 ulp of values near log V (ulp(8) = 9.5e-7); the
            # gradient is stored in the logits' dtype: 2.5 bf16 ulp (2^-8 relative), or ~80 float32 ulp
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(g.float(), g_ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                       atol=1e-6)
            assert g.dtype == dtype
            outs.append((out, g))
        assert all(torch.equal(o, outs[0][0]) and torch.equal(g, outs[0][1]) for o, g in outs)  # pieces change no bit
        assert outs[0][0][:, :5].abs().sum() == 0 and outs[0][0][2, 30:].abs().sum() == 0


def test_keeps_no_float32_logits_for_backward():
    logits, labels = _inputs(torch.bfloat16)
    fp32_logits = logits[:, :-1].numel() * 4  # the last position predicts nothing
    plain_bytes, _ = _saved_bytes(lambda: _reference(logits, labels), logits, labels)
    ours_bytes, out = _saved_bytes(lambda: token_logps(logits, labels, chunk=3 * 101 * 4), logits, labels)
    assert plain_bytes >= fp32_logits  # the upcast logits (and the softmax) are kept
    assert ours_bytes < fp32_logits / 20, (ours_bytes, fp32_logits)  # the log-sum-exp, targets, the valid mask
    out.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_backward_touches_the_logits_a_fixed_number_of_times():
    """Bytes the backward reads and writes per logit element (counted op by op, as tests/test_optim.py counts the
    optimizer's): the same whether the logits come in 1 piece or 36, and at most 27 for bf16 logits: the subtraction
    of the log-sum-exp reads 2 and writes 4 (float32 by promotion, no separate upcast), exp in place 4 + 4, the
    product written into the gradient 4 + 2 + 2 (its out= tensor counted read and written), the gradient's
    accumulation into .grad 2 + 2, and the per-position vectors (log-sum-exp, targets, upstream gradient)."""
    from test_optim import Traffic

    per_element = {}
    for chunk in (10 ** 9, 3 * 101):  # one piece; a position a piece
        logits, labels = _inputs(torch.bfloat16)
        out = token_logps(logits, labels, chunk=chunk)
        with Traffic() as t:
            out.sum().backward()
        per_element[chunk] = t.bytes / logits.numel()
    assert per_element[3 * 101] <= 1.05 * per_element[10 ** 9], per_element
    assert max(per_element.values()) <= 27, per_element


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
