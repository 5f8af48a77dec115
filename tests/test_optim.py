"""MaskedAdamW: without masks it is AdamW; masked-out elements never move (dense and sparse moments, with decay);
slicing bounds its temporaries without changing a bit; and it touches no more memory than torch's fused AdamW
beyond one masking pass (counted op by op with a TorchDispatchMode)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from allo.optim import MaskedAdamW, keep_only


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
    # the same gradients (no feedback through a forward), the update computed in another order: each of 20 steps may
    # round a weight of magnitude ~1 differently by an ulp (1.2e-7); rtol 1e-5 leaves 80 ulp
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


@pytest.mark.parametrize("mode", ["masked", "sparse"])
def test_sliced_step_is_bit_identical(mode, monkeypatch):
    """Sparse gathers and masked weight decay work in slices of STEP_CHUNK elements (bounded temporaries for
    DeepSpeed's flat partitions): many uneven slices end bit-identical to one."""
    import allo.optim

    def run(chunk: int) -> list[torch.Tensor]:
        monkeypatch.setattr(allo.optim, "STEP_CHUNK", chunk)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(1001)), torch.nn.Parameter(torch.randn(37))]
        opt = MaskedAdamW(params, lr=1e-2, weight_decay=0.1, sparse_state=mode == "sparse")
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


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_frozen_elements_never_move_and_dense_and_sparse_agree(sparse, decay):
    """Gradients everywhere (NaN and Inf too, where masked out): masked-out elements keep every bit, selected ones
    follow AdamW; dense and sparse moments give the same selected values."""
    g = torch.Generator().manual_seed(1)
    start = torch.randn(5000, generator=g)
    keep = torch.rand(5000, generator=g) < 0.1
    runs = {}
    for s in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = MaskedAdamW([p], lr=1e-2, weight_decay=decay, sparse_state=s)
        opt.attach_masks({id(p): keep})
        for i in range(6):
            grad = torch.randn(5000, generator=torch.Generator().manual_seed(10 + i))
            grad[~keep][:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
            p.grad = grad
            opt.step()
        runs[s] = p.detach()
    got = runs[sparse]
    assert torch.equal(got[~keep].view(torch.int32), start[~keep].view(torch.int32))
    assert (got[keep] != start[keep]).all()
    # one formula on the same elements stored two ways (vectorised body or scalar tail: an ulp a step), 6 steps
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-6, atol=1e-7)


class Traffic(TorchDispatchMode):
    """Bytes each aten op reads and writes: every tensor argument's bytes, and an op that mutates its arguments
    writes them again; a gather or scatter (index_select, index_copy_, scatter_add_) touches only its indexed elements of the
    big tensor; views and factories of empty tensors cost nothing."""
    FREE = {torch.ops.aten.view.default, torch.ops.aten.slice.Tensor, torch.ops.aten.as_strided.default,
            torch.ops.aten._unsafe_view.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default,
            torch.ops.aten.lift_fresh.default}
    INDEXED = {torch.ops.aten.index_select.default, torch.ops.aten.index_copy_.default,
               torch.ops.aten.scatter_add_.default}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self.FREE or func.is_view:
            return out
        tensors = [t for a in list(args) + list(kwargs.values())
                   for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
        if func in self.INDEXED:  # (self, dim, index[, source]): the indexed elements of self, and the index
            self.bytes += 2 * args[2].numel() * args[0].element_size() + args[2].numel() * args[2].element_size()
            return out
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        if func._schema.is_mutable:
            given = [args[i] if i < len(args) else kwargs.get(a.name) for i, a in enumerate(func._schema.arguments)
                     if a.alias_info and a.alias_info.is_write]  # positional, or a keyword such as out=
            mutated = [t for g in given for t in (g if isinstance(g, (list, tuple)) else [g])
                       if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in mutated)
        elif isinstance(out, torch.Tensor):
            self.bytes += out.numel() * out.element_size()
        return out


def _bytes_per_element(make_opt, n: int = 1 << 16, mask=None, steps: int = 3) -> float:
    p = torch.nn.Parameter(torch.randn(n))
    opt = make_opt([p])
    if mask is not None:
        opt.attach_masks({id(p): mask})
    p.grad = torch.randn(n)
    opt.step()  # the first step allocates the moments
    with Traffic() as t:
        for _ in range(steps):
            opt.step()
    return t.bytes / steps / n


def test_optimizer_traffic_is_near_torchs_fused_adamw():
    """Bytes touched per partition element per step: dense masked at most 1.5× torch's fused AdamW (weight decay 0,
    as every shipped recipe), and the sparse path proportional to the mask."""
    n = 1 << 16
    mask = lambda r: torch.rand(n, generator=torch.Generator().manual_seed(0)) < r  # noqa: E731
    fused = _bytes_per_element(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0, fused=True))
    dense = _bytes_per_element(lambda ps: MaskedAdamW(ps, lr=1e-3), mask=mask(0.1))
    sparse = {r: _bytes_per_element(lambda ps: MaskedAdamW(ps, lr=1e-3, sparse_state=True), mask=mask(r))
              for r in (0.05, 0.1, 0.2)}
    # p, g, m, v read and written (the kernel's schema marks the gradients written too: counted alike for both)
    assert 28 <= fused <= 33, fused
    assert dense <= 1.5 * fused, (dense, fused)
    for r, b in sparse.items():  # a fixed number of bytes per selected element: proportional to the mask
        assert b / r == pytest.approx(sparse[0.1] / 0.1, rel=0.05) and b < dense, sparse


@pytest.mark.parametrize("masked,sparse", [(False, False), (True, False), (True, True)])
def test_clipping_inside_the_step_is_torchs_clip_then_adamw(masked, sparse):
    """max_grad_norm: the norm of the masked gradient (only the selected elements count), the gradients scaled as
    torch.nn.utils.clip_grad_norm_ scales them, then AdamW; on both sides of the threshold."""
    for max_norm in (0.05, 1e3):
        torch.manual_seed(0)
        a = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(33))]
        b = [torch.nn.Parameter(p.detach().clone()) for p in a]
        keep = [torch.rand(p.numel()) < 0.3 for p in a] if masked else None
        ours = MaskedAdamW(a, lr=1e-2, sparse_state=sparse, max_grad_norm=max_norm)
        if masked:
            ours.attach_masks({id(p): k for p, k in zip(a, keep)})
        ref = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.0)
        for _ in range(3):
            grads = [torch.randn_like(p) for p in a]
            for p, q, gr, k in zip(a, b, grads, keep or [None] * 2):
                p.grad = gr.clone()
                q.grad = gr.clone() if k is None else keep_only(gr.clone().view(-1), k).view(gr.shape)
            ours.step()
            norm = torch.nn.utils.clip_grad_norm_(b, max_norm)
            ref.step()
            # a sum of 2081 squares in another order: relative error ~ log2(n)·u = 7e-7 (pairwise / vectorised)
            torch.testing.assert_close(ours.grad_norm, norm, rtol=1e-5, atol=1e-6)
        for p, q, k in zip(a, b, keep or [None] * 2):  # the clip factor's ~1e-6 moves AdamW's scale-free update
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # by less than an ulp; 3 steps of rounding
            if k is not None:
                assert torch.equal(p.detach().view(-1)[~k], q.detach().view(-1)[~k])  # frozen, bit for bit


@pytest.mark.parametrize("sparse", [False, True])
def test_a_nonfinite_norm_skips_the_step_and_moves_nothing(sparse):
    """One NaN (then one Inf) in a selected element's gradient, with clipping: the norm is not finite, so the step
    is skipped on the device: every element, frozen or selected, keeps every bit, the moments and the step count
    stay; the next finite step goes on as the first one would have."""
    torch.manual_seed(0)
    start = torch.randn(3000)
    keep = torch.rand(3000) < 0.2
    p = torch.nn.Parameter(start.clone())
    q = torch.nn.Parameter(start.clone())  # the reference: never sees the bad steps
    opts = []
    for x in (p, q):
        opt = MaskedAdamW([x], lr=1e-2, weight_decay=0.1, sparse_state=sparse, max_grad_norm=1.0)
        opt.attach_masks({id(x): keep})
        opts.append(opt)
    selected = int(keep.nonzero()[0])
    for bad in (float("nan"), float("inf")):
        grad = torch.randn(3000)
        grad[selected] = bad
        p.grad = grad
        opts[0].step()
        assert torch.equal(p.detach().view(torch.int32), start.view(torch.int32)), bad
        assert not torch.isfinite(opts[0].grad_norm)
    good = torch.randn(3000)
    p.grad, q.grad = good.clone(), good.clone()
    opts[0].step()
    opts[1].step()
    assert torch.equal(p.detach(), q.detach())  # as if the bad steps never happened (step count, moments, decay)
    assert torch.equal(p.detach()[~keep], start[~keep]) and (p.detach()[keep] != start[keep]).all()


@pytest.mark.parametrize("sparse", [False, True])
def test_an_engine_norm_that_is_not_finite_skips_the_step_without_clipping(sparse):
    """Under ZeRO-3 the engine clips and hands the optimizer its global norm (`norm_source`, read on the device):
    NaN or Inf there skips the step as clipping's own would, bit for bit, the step count included; a finite norm
    steps as if no norm were given."""
    torch.manual_seed(0)
    start = torch.randn(3000)
    keep = torch.rand(3000) < 0.2
    p, q = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    norms = iter([torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(2.0)])
    opts = []
    for x, source in ((p, lambda: next(norms)), (q, None)):
        opt = MaskedAdamW([x], lr=1e-2, weight_decay=0.1, sparse_state=sparse)
        opt.attach_masks({id(x): keep})
        opt.norm_source = source
        opts.append(opt)
    for _ in range(2):
        p.grad = torch.randn(3000)
        opts[0].step()
        assert torch.equal(p.detach().view(torch.int32), start.view(torch.int32))
        assert all(not t.any() for t in opts[0].state[p].values())  # moments and step count untouched
    good = torch.randn(3000)
    p.grad, q.grad = good.clone(), good.clone()
    opts[0].step()
    opts[1].step()
    assert torch.equal(p.detach(), q.detach())
