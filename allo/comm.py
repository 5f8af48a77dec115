"""Collectives with each tensor on a device its process group accepts.

NCCL moves only GPU tensors, and its object collectives pickle through the GPU of each rank. So on GPUs a
`Communicator` sends tensors that live on the run's device through the main (NCCL) group, and CPU tensors and
pickled objects (locate's histograms and ties, fp32 weight slices, error messages) through a gloo side group made
once at start. On CPU the main group is gloo already and there is no side group.
"""
from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any, Optional

import torch

_timeout: Optional[timedelta] = None  # the main group's (distributed.timeout_minutes), set by engine.init_distributed


def set_timeout(minutes: Optional[float]) -> None:
    """The collective timeout of every group made here: the recipe's, like the main group's (None: torch's 30 min)."""
    global _timeout
    _timeout = timedelta(minutes=minutes) if minutes else None


@functools.cache
def _side_group() -> Any:
    """The gloo group for CPU tensors and objects, one per process (the stages of `allo run` share it), with the
    main group's timeout."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", **({"timeout": _timeout} if _timeout else {}))


class Communicator:
    """sum/mean/max all-reduce, object all-gather and gather, barrier; with one rank each returns at once (not only
    to save a call: on CPU a large gloo all-gather starts a second OpenMP team that slows every later step,
    bench/RESULTS.md, profiling note 1)."""

    def __init__(self, dist: Any, rank: int, world: int, device: torch.device, cpu_group: Optional[Any] = None):
        """`dist`: torch.distributed (or a stand-in with its functions); `cpu_group`: the gloo side group, None when
        the main group is gloo."""
        self.dist, self.rank, self.world, self.device, self.cpu_group = dist, rank, world, device, cpu_group

    @classmethod
    def from_process_group(cls, device: torch.device) -> "Communicator":
        """Collective the first time in a process: every rank creates the side group together."""
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        return cls(dist, rank, world, device, _side_group() if device.type != "cpu" and world > 1 else None)

    def _group(self, tensor: Optional[torch.Tensor] = None) -> Any:
        """The group for a tensor (None: for pickled objects)."""
        on_device = tensor is not None and tensor.device.type == self.device.type
        return None if on_device or self.cpu_group is None else self.cpu_group

    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """Collective: sum/mean/max over ranks, in place."""
        if self.world == 1:
            return tensor
        reduce_op = self.dist.ReduceOp.MAX if op == "max" else self.dist.ReduceOp.SUM
        self.dist.all_reduce(tensor, op=reduce_op, group=self._group(tensor))
        if op == "mean":
            tensor /= self.world
        return tensor

    def all_gather_object(self, obj: Any) -> list:
        """Collective: every rank's object, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self._group())
        return out

    def gather_object(self, obj: Any) -> Optional[list]:
        """Collective: every rank's object, in rank order, on rank 0 only (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        self.dist.gather_object(obj, out, dst=0, group=self._group())
        return out

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier()
