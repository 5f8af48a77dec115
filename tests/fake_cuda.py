"""CUDA's device rules on a CPU-only machine, with real data: tensors that say `cuda:0` and refuse to mix.

`FakeCuda` wraps a CPU tensor and reports device `cuda:N`; under `fake_cuda()` every op checks its tensor arguments
the way CUDA kernels do, runs on the CPU tensors inside, and wraps what a cuda op returns. Factories and `.to()`
with `device="cuda"` / `"cuda:1"` make FakeCuda tensors. The rules, each as torch states it:
- tensors on two devices refuse to mix, and cuda:0 and cuda:1 are two devices (no implicit move between GPUs since
  torch 1.6: pytorch/pytorch#38998);
- a 0-dim CPU tensor joins a CUDA op only as a scalar of an elementwise (TensorIterator) op, ops tagged
  `torch.Tag.pointwise` (pytorch/pytorch#119609: "Only scalar Tensor (ndim==0) are automatically moved to cuda");
  anywhere else, `stack`, `cat`, `index_select`, a fused optimizer kernel's `step` / `grad_scale` / `found_inf`, it
  is a CPU tensor like any other and refused;
- `index`: a CUDA tensor takes CPU indices (CUDA moves them), a CPU tensor does not take CUDA indices.
(Host syncs are caught on the meta device instead: tests/test_host_syncs.py.)

So a device bug that only a GPU used to meet ("Expected all tensors to be on the same device") fails on CPU.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._pytree import tree_map
from torch.utils._python_dispatch import TorchDispatchMode

CUDA = torch.device("cuda", 0)
aten = torch.ops.aten
# ops that move data across devices
CROSSING = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default,
            aten.lift_fresh.default, aten.set_.source_Tensor}
# ops whose index arguments CUDA moves to the indexed tensor's GPU (not the other way round)
INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it lives on cuda:0."""
    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, index: int = 0) -> "FakeCuda":
        t = torch.Tensor._make_wrapper_subclass(cls, inner.size(), strides=inner.stride(),
                                                storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                device=torch.device("cuda", index),
                                                requires_grad=inner.requires_grad)
        t.inner = inner
        return t

    def __repr__(self) -> str:
        return f"FakeCuda({self.inner!r})"

    # Python bindings that consult the (absent) CUDA runtime before dispatch: route them to the aten ops.
    def __invert__(self) -> torch.Tensor:
        return torch.ops.aten.bitwise_not(self)

    def nonzero(self, *, as_tuple: bool = False):
        out = torch.ops.aten.nonzero(self)
        return tuple(out.unbind(1)) if as_tuple else out

    def __getitem__(self, key):
        """Basic indexing (ints, slices, None, ...) through aten's view ops; tensor keys through aten.index."""
        if isinstance(key, torch.Tensor):
            return torch.ops.aten.index(self, [key])
        keys = key if isinstance(key, tuple) else (key,)
        if Ellipsis in keys:
            at = keys.index(Ellipsis)
            fill = self.dim() - (len(keys) - 1 - sum(k is None for k in keys))
            keys = keys[:at] + (slice(None),) * fill + keys[at + 1:]
        out, dim = self, 0
        for k in keys:
            if k is None:
                out = torch.ops.aten.unsqueeze(out, dim)
                dim += 1
            elif isinstance(k, slice):
                start, stop, step = k.indices(out.shape[dim])
                out = torch.ops.aten.slice(out, dim, start, max(start, stop), step)
                dim += 1
            elif isinstance(k, int):
                out = torch.ops.aten.select(out, dim, k)
            else:
                raise TypeError(f"FakeCuda indexing with {type(k).__name__} is not emulated")
        return out

    def __setitem__(self, key, value) -> None:
        target = self[key]
        if isinstance(value, torch.Tensor):
            torch.ops.aten.copy_(target, value)
        else:
            torch.ops.aten.fill_(target, value)

    def copy_(self, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        return torch.ops.aten.copy_(self, src, non_blocking)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return FakeCudaMode.current().dispatch(func, args, kwargs or {})


def _is_cuda_device(d: Any) -> bool:
    return d is not None and torch.device(d).type == "cuda"


class FakeCudaMode(TorchDispatchMode):
    _active: list["FakeCudaMode"] = []

    @classmethod
    def current(cls) -> "FakeCudaMode":
        if not cls._active:
            raise RuntimeError("FakeCuda tensors are used only inside fake_cuda()")
        return cls._active[-1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.dispatch(func, args, kwargs or {})

    def dispatch(self, func, args, kwargs):
        devices, scalars = set(), set()
        pointwise = torch.Tag.pointwise in getattr(func, "tags", ())

        def note(x):
            if isinstance(x, FakeCuda):
                devices.add(str(x.device))
            elif isinstance(x, torch.Tensor) and x.device.type != "meta":
                (scalars if x.dim() == 0 and pointwise else devices).add(str(x.device))
            return x

        tree_map(note, (args, kwargs))
        if func in INDEXING and isinstance(args[0], torch.Tensor):  # the indices follow the indexed tensor
            first = str(args[0].device)
            if first.startswith("cuda"):
                devices = {d for d in devices if d != "cpu"}
            elif any(d.startswith("cuda") for d in devices):
                raise RuntimeError(f"{func}: indices should be either on cpu or on the same device as the indexed "
                                   f"tensor ({first})")
        if len(devices) > 1 and func not in CROSSING:
            raise RuntimeError(f"{func}: Expected all tensors to be on the same device, but found at least two "
                               f"devices, {' and '.join(sorted(devices))}!")
        cuda_index = next((int(d.split(":")[1]) for d in sorted(devices | scalars) if d.startswith("cuda")), 0)
        to_cuda = _is_cuda_device(kwargs.get("device"))
        leaving = "device" in kwargs and kwargs["device"] is not None and not to_cuda
        unwrapped = tree_map(lambda x: x.inner if isinstance(x, FakeCuda) else x, (args, kwargs))
        a, kw = unwrapped
        if "device" in kw and to_cuda:
            cuda_index = torch.device(kw["device"]).index or 0
            kw = {**kw, "device": torch.device("cpu")}
        with torch.utils._python_dispatch._disable_current_modes():
            out = func(*a, **kw)
        on_cuda = any(d.startswith("cuda") for d in devices | scalars)
        make_cuda = to_cuda or (on_cuda and not leaving and func is not aten._local_scalar_dense.default)
        if func is aten.copy_.default or func._schema.is_mutable and isinstance(args[0], torch.Tensor) \
                and out is a[0]:
            return args[0]  # in place: the same wrapper
        if not make_cuda:
            return out
        return tree_map(lambda x: FakeCuda(x, cuda_index) if isinstance(x, torch.Tensor) and not isinstance(x, FakeCuda)
                        else x, out)


@contextmanager
def fake_cuda() -> Iterator[FakeCudaMode]:
    """Inside: `torch.zeros(..., device="cuda")`, `t.cuda()` and `t.to("cuda")` give FakeCuda tensors."""
    mode = FakeCudaMode()
    torch._C._ensureCUDADeviceGuardSet()  # a no-op cuda device guard on a CPU-only build (as FakeTensorMode does)
    lazy_init = torch.cuda._lazy_init  # factories with device="cuda" call it before dispatch; nothing to initialise
    torch.cuda._lazy_init = lambda: None
    FakeCudaMode._active.append(mode)
    try:
        with mode:
            yield mode
    finally:
        FakeCudaMode._active.pop()
        torch.cuda._lazy_init = lazy_init


def cuda(t: torch.Tensor, index: int = 0) -> FakeCuda:
    """A FakeCuda copy of a CPU tensor on cuda:`index` (use inside fake_cuda())."""
    return FakeCuda(t.detach().clone().requires_grad_(t.requires_grad), index)


def real(t: torch.Tensor) -> torch.Tensor:
    """The CPU data inside a FakeCuda tensor (or the tensor itself)."""
    return t.inner if isinstance(t, FakeCuda) else t
