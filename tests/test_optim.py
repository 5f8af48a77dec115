"""MaskedAdamW's arithmetic: the clamped square root changes no denominator, and without masks it is AdamW."""
import math

import pytest
import torch

from allo.optim import TINY, MaskedAdamW, keep_only


@pytest.mark.parametrize("beta2", [0.95, 0.999, 0.9999])
@pytest.mark.parametrize("eps", [1e-8, 1e-9])
def test_clamped_sqrt_gives_the_same_denominators(beta2, eps):
    """Zeros (every masked-out moment), subnormals and ordinary second moments: bit-identical denominators."""
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.zeros(1000), torch.rand(1000, generator=g) * TINY, torch.rand(1000, generator=g) * 1e-30,
                   torch.rand(1000, generator=g) * 1e-6, torch.rand(1000, generator=g)])
    for step in (1, 2, 10, 1000):
        c = math.sqrt(1 - beta2 ** step)
        plain = (v.sqrt() / c).add_(eps)
        clamped = (v.clamp_min(TINY).sqrt_() / c).add_(eps)
        assert torch.equal(plain, clamped), (step, (plain != clamped).sum())


def test_without_masks_it_follows_torch_adamw():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    ours = MaskedAdamW(a, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        grads = [torch.randn_like(p) * torch.rand(()) for p in a]
        grads[0][:8] = 0  # rows that get no gradient, as unseen embedding rows do
        for params, opt in ((a, ours), (b, ref)):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("inplace", [True, False])
def test_keep_only_is_masked_fill_bit_for_bit(dtype, inplace):
    """Random mask over values that include NaN, ±Inf, −0.0 and subnormals: the same bits as masked_fill(~keep, 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4099, generator=g).to(dtype)
    x[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, torch.finfo(dtype).tiny / 4, -1e-3])
    keep = torch.rand(4099, generator=g) < 0.3
    keep[:6] = torch.tensor([True, True, True, True, True, False])
    keep[6:12] = False  # and the dropped NaN/Inf case
    x[6:9] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    want = x.masked_fill(~keep, 0)
    src = x.clone()
    got = keep_only(src, keep, inplace=inplace)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # bits, so NaN == NaN and -0.0 != +0.0
    assert torch.equal(src.view(torch.uint8), (want if inplace else x).view(torch.uint8))


def test_keep_only_falls_back_for_other_layouts():
    x = torch.randn(8, 6)[:, ::2]  # not contiguous
    keep = torch.rand(8, 3) < 0.5
    assert torch.equal(keep_only(x.clone(), keep), x.masked_fill(~keep, 0))


@pytest.mark.parametrize("mode", ["plain", "masked", "sparse"])
def test_chunked_step_is_bit_identical(mode, monkeypatch):
    """The update runs in slices of STEP_CHUNK elements (bounded temporaries for DeepSpeed's flat partitions): a
    tensor split into many uneven slices ends bit-identical to one slice, with and without masks and sparse state."""
    import allo.optim

    sizes: list[int] = []
    update = allo.optim._adamw_update

    def recorded(m, *rest):
        sizes.append(m.numel())
        return update(m, *rest)

    monkeypatch.setattr(allo.optim, "_adamw_update", recorded)

    def run(chunk: int) -> list[torch.Tensor]:
        monkeypatch.setattr(allo.optim, "STEP_CHUNK", chunk)
        sizes.clear()
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(1001)), torch.nn.Parameter(torch.randn(37))]
        opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.1, sparse_state=mode == "sparse")
        if mode != "plain":
            opt.attach_masks({id(p): torch.rand(p.numel(), generator=torch.Generator().manual_seed(i)) < 0.3
                              for i, p in enumerate(params)})
        for _ in range(5):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        return [p.detach().clone() for p in params] + [t for s in opt.state.values() for k, t in s.items()
                                                        if k.startswith("exp")]

    whole, sliced = run(1 << 24), run(64)
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced))
    assert max(sizes) <= 64 and len(sizes) > 10  # every temporary of the update is one slice's size
