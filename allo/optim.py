"""MaskedAdamW: AdamW that updates only the elements of a neuron mask, with optional sparse moments.

DeepSpeed gives the client optimizer flat fp32 tensors (see masks/apply.py); ``attach_masks`` hands it one
bool mask per such tensor. Masked-out elements are never moved: their gradient is zeroed in the same pass that
reads it, so on moments that stay zero torch's fused AdamW kernel moves them by exactly 0, and decoupled weight
decay is applied to the selected elements only. The step is torch's one-pass fused kernel (p, g, m, v read once,
p, m, v written once) plus that masking pass, with no host synchronisation. With ``sparse_state=True`` the moments
live only at the selected elements (two floats each), so at a 10% mask they cost a tenth of dense AdamW's; the
selected elements are gathered, stepped by the same kernel and scattered back, so both follow the same trajectory.

Before masks are attached (and for tensors with no mask) it is plain AdamW, torch's fused AdamW, which is what the
unmasked stages use.

With ``max_grad_norm`` it also clips, where DeepSpeed's own clipping would cost more (ZeRO-0 without a
mixed-precision wrapper: a norm kernel per parameter, a second pass that scales every gradient, and host-to-device
copies that wait for the device): the global norm of the (masked) gradients is taken on the device and the
clipping factor goes into the fused kernel's gradient scale, so clipping adds one read of the gradients and no
write. ``grad_norm`` holds the last step's norm, a device tensor. A norm that is not finite (a NaN or Inf in any
selected gradient) skips the whole step on the device, through the kernel's ``found_inf``: no weight, moment or step
count moves, the frozen elements included; the training loop counts such steps from the logged norm.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch


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


# Sparse moments gather, step and scatter slices of at most this many selected elements, and masked weight decay
# works on slices of this size: DeepSpeed hands the optimizer whole flat partitions (a 7B model's ZeRO-3 partition
# on 16 GPUs is 437M elements), and a temporary of that size would otherwise exist (bench/RESULTS.md, "allo plan").
# Elementwise arithmetic, so the result does not depend on it. The dense step itself has no temporaries.
STEP_CHUNK = 1 << 24


def _fused_adamw(params: list[torch.Tensor], grads: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor],
                 step: torch.Tensor, lr: float, betas: tuple[float, float], eps: float, decay: float,
                 grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None) -> None:
    """torch's fused AdamW kernel: one pass that reads p, g, m, v and writes p, m, v (28 bytes an fp32 element);
    `step` (on the parameters' device) already counts this step, so nothing waits for the device. The kernel divides
    the gradients by `grad_scale` as it reads them, and leaves p, m and v untouched where `found_inf` is 1."""
    torch._fused_adamw_(params, grads, m, v, [], [step] * len(params), lr=lr, beta1=betas[0], beta2=betas[1],
                        weight_decay=decay, eps=eps, amsgrad=False, maximize=False, grad_scale=grad_scale,
                        found_inf=found_inf)


class MaskedAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, sparse_state: bool = False, max_grad_norm: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.sparse_state = sparse_state
        self.max_grad_norm = max_grad_norm
        self.grad_norm: Optional[torch.Tensor] = None
        # Where the optimizer does not clip: the engine's global gradient norm of this step, read on the device, so
        # that a NaN or Inf norm skips the step here instead of on the host (allo.engine.skip_nonfinite_on_device)
        self.norm_source: Optional[Callable[[], torch.Tensor]] = None
        self._masks: dict[int, torch.Tensor] = {}
        self._index: dict[int, torch.Tensor] = {}

    def attach_masks(self, masks: dict[int, torch.Tensor]) -> None:
        """`masks` maps id(optimizer tensor) -> flat bool mask of the same numel, kept as given (no copy) on that
        tensor's device; one on another device is refused here rather than at the first step. Before any real step:
        masked-out elements rely on their moments being zero. (DeepSpeed's mixed-precision wrappers run one step on
        zero gradients to create the state; that all-zero state is dropped.)"""
        tensors = {id(p): p for group in self.param_groups for p in group["params"]}
        for k in masks:
            state = self.state.get(tensors[k]) if k in tensors else None
            if state:
                if any(bool(t.any()) for n, t in state.items() if n.startswith("exp_avg")):
                    raise RuntimeError("attach masks before the first optimizer step with a gradient")
                del self.state[tensors[k]]
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

    def _clip_scale(self, params: list[torch.Tensor]) -> torch.Tensor:
        """What the fused kernel divides the gradients by: max(1, ‖g‖ / max_grad_norm) over the masked gradients
        (masked-out elements zeroed here, or for sparse moments only the selected ones read), as
        torch.nn.utils.clip_grad_norm_ scales them; on the device, nothing waits for it."""
        dense, pieces = [], []
        for p in params:
            keep, index, g = self._masks.get(id(p)), self._index.get(id(p)), p.grad.view(-1)
            if index is not None:
                pieces += [g.index_select(0, index[at:at + STEP_CHUNK].long()).norm()
                           for at in range(0, index.numel(), STEP_CHUNK)]
                continue
            if keep is not None:
                keep_only(g, keep)
            dense.append(g)
        norms = list(torch._foreach_norm(dense)) + pieces if dense else pieces
        self.grad_norm = torch.linalg.vector_norm(torch.stack(norms))
        return ((self.grad_norm + 1e-6) / self.max_grad_norm).clamp_(min=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p in params:
            if p.dtype != torch.float32 or p.grad.dtype != torch.float32:
                raise TypeError(f"MaskedAdamW steps fp32 tensors (DeepSpeed's master weights), got {p.dtype} "
                                f"with {p.grad.dtype} gradients")
        scale = self._clip_scale(params) if self.max_grad_norm and params else None
        norm = self.grad_norm if scale is not None else self.norm_source() if self.norm_source and params else None
        skip = None  # else 1.0 (on the parameters' device) where the norm is NaN or Inf: the step is skipped
        if norm is not None:
            skip = (~torch.isfinite(torch.as_tensor(norm))).to(device=params[0].device, dtype=torch.float32)
        keep_step = None if skip is None else 1.0 - skip
        for group in self.param_groups:
            lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                keep, index = self._masks.get(id(p)), self._index.get(id(p))
                flat_p, flat_g = p.view(-1), p.grad.view(-1)
                state = self.state[p]
                if not state:
                    n = flat_p.numel() if index is None else index.numel()
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros(n, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, device=p.device)
                elif state["step"].device != p.device:  # a checkpoint's step count comes back on the CPU
                    state["step"] = state["step"].to(p.device)
                state["step"] += 1 if keep_step is None else keep_step
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if index is not None:  # sparse moments: gather the selected elements, step them, scatter back
                    for at in range(0, index.numel(), STEP_CHUNK):
                        idx = index[at:at + STEP_CHUNK].long()
                        values, grad = flat_p.index_select(0, idx), flat_g.index_select(0, idx)
                        _fused_adamw([values], [grad], [m[at:at + STEP_CHUNK]], [v[at:at + STEP_CHUNK]],
                                     state["step"], lr, betas, eps, wd, scale, skip)
                        flat_p.index_copy_(0, idx, values)
                    continue
                if keep is None:
                    _fused_adamw([flat_p], [flat_g], [m], [v], state["step"], lr, betas, eps, wd, scale, skip)
                    continue
                # A masked-out element gets a zero gradient on moments that are zero, so the fused step moves it by
                # exactly 0; only the selected elements decay.
                if scale is None:  # else _clip_scale has masked it
                    keep_only(flat_g, keep)
                if wd:
                    decay = lr * wd if keep_step is None else keep_step * (lr * wd)
                    for at in range(0, flat_p.numel(), STEP_CHUNK):
                        sl = slice(at, at + STEP_CHUNK)
                        flat_p[sl].sub_(keep_only(flat_p[sl] * decay, keep[sl]))
                _fused_adamw([flat_p], [flat_g], [m], [v], state["step"], lr, betas, eps, 0.0, scale, skip)
        return loss
