"""MaskedAdamW: AdamW that updates only the elements of a neuron mask, with optional sparse moments.

DeepSpeed gives the client optimizer flat fp32 tensors (see masks/apply.py); ``attach_masks`` hands it one
bool mask per such tensor. Masked-out elements are never touched: not by the Adam step, not by decoupled
weight decay, not by bias correction. With ``sparse_state=True`` the moments live only at the selected
elements (two floats each), so at a 10% mask they cost a tenth of dense AdamW's; the arithmetic on the
selected elements is the same as the dense path, so both follow the same trajectory.

Before masks are attached (and for tensors with no mask) it behaves as plain AdamW, the same math as
``torch.optim.AdamW``, which is what the unmasked stages use.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch


# Second moments are clamped to the smallest normal float32 before the square root: torch's CPU sqrt is much slower
# on zeros (bench/RESULTS.md, profiling note 9), and under a 10% mask 90% of the moments are 0.
# The result is unchanged: sqrt(TINY) / sqrt(1 − β2) ≤ 3.4e-18 for β2 ≤ 0.999, below half an ulp of any eps ≥ 1e-9.
TINY = torch.finfo(torch.float32).tiny
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size integer views of float dtypes


def keep_only(x: torch.Tensor, keep: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """`x` with every element outside the bool mask `keep` set to +0.0, i.e. `x.masked_fill(~keep, 0)`, computed as
    an integer multiply of x's bits by the mask's 0/1 bytes: exact (a kept element keeps every bit, NaN and Inf
    included; a dropped one becomes all-zero bits) and on CPU faster than masked_fill on a random mask
    (bench/RESULTS.md, profiling note 10). Other layouts fall back to masked_fill."""
    ints = _INT_OF_SIZE.get(x.element_size())
    if ints is None or not x.is_floating_point() or not x.is_contiguous() or keep.shape != x.shape:
        return x.masked_fill_(~keep, 0) if inplace else x.masked_fill(~keep, 0)
    bits, ones = x.view(ints), keep.view(torch.uint8)
    return bits.mul_(ones).view(x.dtype) if inplace else torch.mul(bits, ones).view(x.dtype)


# The update runs over slices of at most this many elements: DeepSpeed hands the optimizer whole flat partitions
# (a 7B model's ZeRO-3 partition on 16 GPUs is 437M elements), and each temporary of the update would otherwise be
# that size (bench/RESULTS.md, "allo plan"). Elementwise arithmetic, so the result does not depend on it.
STEP_CHUNK = 1 << 24


def _adamw_update(m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, values: torch.Tensor, beta1: float,
                  beta2: float, step_size: float, bias2: float, eps: float, decay: float) -> torch.Tensor:
    """Moments updated in place; returns the (negative) step of AdamW for these elements, decay included."""
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.clamp_min(TINY).sqrt_() / bias2).add_(eps)
    update = (m / denom).mul_(-step_size)
    if decay:
        update.add_(values, alpha=-decay)
    return update


class MaskedAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, sparse_state: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.sparse_state = sparse_state
        self._masks: dict[int, torch.Tensor] = {}
        self._index: dict[int, torch.Tensor] = {}

    def attach_masks(self, masks: dict[int, torch.Tensor]) -> None:
        """`masks` maps id(optimizer tensor) -> flat bool mask of the same numel, kept as given (no copy) on that
        tensor's device; one on another device is refused here rather than at the first step."""
        tensors = {id(p): p for group in self.param_groups for p in group["params"]}
        for k, m in masks.items():
            if k in tensors and m.device != tensors[k].device:
                raise ValueError(f"a neuron mask on {m.device} for an optimizer tensor on {tensors[k].device}: build "
                                 "masks on the device of the tensor they mask (allo.masks.apply.build_masks)")
        self._masks = {k: v.to(torch.bool).flatten() for k, v in masks.items()}
        # Indices are cached outside `state`: torch's load_state_dict would cast them to float.
        # int32 indices (4 bytes per selected element; ZeRO partitions stay below 2**31 elements).
        self._index = {k: v.nonzero().squeeze(1).to(torch.int32 if v.numel() < 2 ** 31 else torch.int64)
                       for k, v in self._masks.items()} if self.sparse_state else {}

    def state_bytes(self) -> int:
        """Bytes held by the Adam moments (what dense vs sparse state is measured by)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for k, t in s.items()
                   if k in ("exp_avg", "exp_avg_sq"))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                keep = self._masks.get(id(p))
                index = self._index.get(id(p))
                flat_p, flat_g = p.view(-1), p.grad.view(-1)
                if index is not None:  # sparse moments: gather, update, scatter
                    values, grad = flat_p.index_select(0, index), flat_g.index_select(0, index).float()
                else:
                    values, grad = flat_p, flat_g
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(values, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(values, dtype=torch.float32)
                state["step"] += 1
                step = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                step_size = lr / (1 - beta1 ** step)
                bias2 = math.sqrt(1 - beta2 ** step)
                for at in range(0, values.numel(), STEP_CHUNK):  # temporaries of one chunk at a time
                    sl = slice(at, at + STEP_CHUNK)
                    update = _adamw_update(m[sl], v[sl], grad[sl], values[sl], beta1, beta2, step_size, bias2, eps,
                                           lr * wd)
                    if index is not None:
                        flat_p.index_add_(0, index[sl], update.to(flat_p.dtype))
                    elif keep is not None:
                        flat_p[sl].add_(keep_only(update, keep[sl]).to(flat_p.dtype))
                    else:
                        flat_p[sl].add_(update.to(flat_p.dtype))
        return loss
