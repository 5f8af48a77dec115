"""Mapping neuron masks onto DeepSpeed's partitions: the one module (with engine.py) that knows ZeRO internals.

DeepSpeed hands the inner (client) optimizer flat fp32 tensors: under ZeRO-3 one flat partition per
sub-group (``fp32_partitioned_groups_flat``, each parameter's slice at ``grad_position``), under ZeRO-1/2
one flat partition per group (``single_partition_of_fp32_groups``, each parameter's fragment at
``_hp_mapping``), under ZeRO-0 the parameters (or their fp32 copies) themselves. ``optimizer_layout`` lists,
for every piece, which element range of which named parameter lives where; each rank then reads only those
ranges of the mask file (``MaskFile.range``), so no rank ever holds a full mask under ZeRO-1/2/3.

Two things use the layout:
- the optimizer (``MaskedAdamW``) masks the Adam update and weight decay of every element it owns;
- ``GradMasker`` zeroes masked-out gradients between ``engine.backward`` and ``engine.step`` so that gradient
  clipping sees the masked gradient (ZeRO-3: each sub-group's gradient partitions in place, at the
  accumulation boundary; ZeRO-0/1/2: a tensor hook on each parameter, which runs before
  DeepSpeed's reduction hooks and so also holds under gradient accumulation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from allo.masks.io import MaskFile
from allo.optim import keep_only


@dataclass
class Piece:
    name: str                 # parameter name
    param: torch.nn.Parameter
    target: torch.Tensor      # the tensor the inner optimizer updates
    target_offset: int        # where this piece starts inside `target` (flattened)
    start: int                # where it starts inside the flattened parameter
    numel: int


def optimizer_layout(engine: Any, named_params: list[tuple[str, torch.nn.Parameter]]) -> list[Piece]:
    """Every (parameter range -> optimizer tensor range) piece this rank owns, for ZeRO stage 0..3."""
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    pieces: list[Piece] = []
    trainable = [(n, p) for n, p in named_params if p.requires_grad]
    if stage == 3:
        for name, p in trainable:
            group, offset, numel = opt.grad_position[opt.get_param_id(p)]
            part = p.ds_tensor.numel()
            rank = opt._get_param_partition_rank(p)
            pieces.append(Piece(name, p, opt.fp32_partitioned_groups_flat[group], offset, rank * part, numel))
    elif stage in (1, 2):
        for name, p in trainable:
            hp = getattr(p, "_hp_mapping", None)
            if hp is None:  # this rank's partition holds no element of p
                continue
            target = opt.single_partition_of_fp32_groups[hp.param_group_index]
            pieces.append(Piece(name, p, target, hp.hp_fragment_address.start, hp.lp_fragment_address.start,
                                hp.lp_fragment_address.numel))
    else:
        fp32_groups = getattr(opt, "fp32_groups", None)
        lp_groups = getattr(opt, "fp16_groups", None) or getattr(opt, "bf16_groups", None)
        masters = {}
        if fp32_groups is not None and lp_groups is not None:  # bf16/fp16 stage 0: fp32 master copies
            for lp_group, hp_group in zip(lp_groups, fp32_groups):
                masters.update({id(lp): hp for lp, hp in zip(lp_group, hp_group)})
        for name, p in trainable:
            pieces.append(Piece(name, p, masters.get(id(p), p), 0, 0, p.numel()))
    return pieces


def partition_slices(engine: Any, named_params: list[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, int, torch.Tensor]]:
    """This rank's (parameter name, flat start, fp32 master values) under ZeRO-1/2/3: disjoint element ranges that
    together cover every trainable parameter exactly once, padding cut off. What `locate_partitioned` scores."""
    if engine.zero_optimization_stage() == 0:
        raise RuntimeError("locating from partitions needs ZeRO-1/2/3 (under ZeRO-0 every rank holds everything)")
    out = []
    for piece in optimizer_layout(engine, named_params):
        full = piece.param.ds_numel if hasattr(piece.param, "ds_numel") else piece.param.numel()
        n = min(piece.numel, full - piece.start)
        if n > 0:
            flat = piece.target.view(-1)
            out.append((piece.name, piece.start, flat[piece.target_offset:piece.target_offset + n]))
    return out


def fp32_masters(engine: Any,
                 named_params: list[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, int, torch.Tensor]]:
    """This rank's (name, flat start, fp32 master values): its ZeRO-1/2/3 partition slices, or under ZeRO-0 every
    parameter whole (each rank holds the same)."""
    if engine.zero_optimization_stage() > 0:
        return partition_slices(engine, named_params)
    return [(p.name, 0, p.target.view(-1)[:p.numel]) for p in optimizer_layout(engine, named_params)]


def find_optimizer(engine: Any, cls: type) -> Any:
    """The client optimizer of type `cls` inside DeepSpeed's wrappers (ZeRO and mixed-precision optimizers)."""
    opt = engine.optimizer
    for _ in range(4):
        if isinstance(opt, cls):
            return opt
        opt = getattr(opt, "optimizer", None)
    raise RuntimeError(f"no {cls.__name__} found inside {type(engine.optimizer).__name__}")


def build_masks(mask_file: str, pieces: list[Piece],
                names: Optional[dict[str, str]] = None) -> dict[int, torch.Tensor]:
    """This rank's mask ranges, one flat bool mask per optimizer tensor id, on that tensor's device (the GPU, or the
    CPU under optimizer offload). The optimizer and `GradMasker` both read these: one mask per element owned.
    `names`: parameter name -> its name in the file (`allo.masks.io.check_against_model`; default the same)."""
    names = names or {}
    target_masks: dict[int, torch.Tensor] = {}
    with MaskFile(mask_file) as f:
        for piece in pieces:
            flat = target_masks.get(id(piece.target))
            if flat is None:
                flat = target_masks[id(piece.target)] = torch.zeros(piece.target.numel(), dtype=torch.bool,
                                                                    device=piece.target.device)
            flat[piece.target_offset: piece.target_offset + piece.numel] = f.range(
                names.get(piece.name, piece.name), piece.start, piece.numel)
    return target_masks


@dataclass
class _Zero3Group:
    """One ZeRO-3 sub-group: its mask (the optimizer's own), where its gradients start in DeepSpeed's flat buffer of
    gradient partitions (that buffer holds every sub-group's partitions in order), and (param id, offset, numel) of
    each parameter inside it, for the norms an offloaded step clips with."""
    index: int
    keep: torch.Tensor
    start: int
    params: list[tuple[int, int, int]]


def _zero3_groups(opt: Any, target_masks: dict[int, torch.Tensor]) -> list[_Zero3Group]:
    """The masked sub-groups of a ZeRO-3 optimizer. The layout is checked against the flat buffers' sizes, so that a
    DeepSpeed that lays its gradients out otherwise stops here instead of masking the wrong elements."""
    groups, start = [], 0
    for g, params in enumerate(opt.fp16_groups):
        n = sum(p.partition_numel() for p in params)
        target = opt.fp32_partitioned_groups_flat[g]
        keep = target_masks.get(id(target))
        if keep is not None:
            if keep.numel() != n:
                raise RuntimeError(f"ZeRO-3 sub-group {g}: {n} gradient elements but {keep.numel()} in its fp32 "
                                   f"partition; this DeepSpeed lays out gradients unlike the one allo was built for")
            positions = [(opt.get_param_id(p), *opt.grad_position[opt.get_param_id(p)][1:]) for p in params]
            groups.append(_Zero3Group(g, keep, start, positions))
        start += n
    buffer = getattr(opt, "grad_partitions_flat_buffer", None)
    if buffer is not None and buffer.numel() != start:
        raise RuntimeError(f"ZeRO-3: the flat gradient buffer holds {buffer.numel()} elements, the sub-groups "
                           f"{start}; this DeepSpeed lays out gradients unlike the one allo was built for")
    return groups


def _swapped(opt: Any, group: int) -> bool:
    """Whether DeepSpeed swaps this sub-group's optimizer state to NVMe (then only its local-grad API reaches it)."""
    return bool(getattr(opt, "swap_optimizer", False)) and opt._swappable_optimizer_subgroup(group)


def _wait_for_reduction(opt: Any) -> None:
    """Make what follows see the reduced gradient partitions. On the device: the current stream waits for DeepSpeed's
    reduce stream (no host sync). Under CPU offload the host reads the partitions, so it waits once for the stream
    that copied them there."""
    from deepspeed.accelerator import get_accelerator

    stream = getattr(opt, "reduce_and_partition_stream", None)
    accelerator = get_accelerator()
    if stream is None or accelerator.resolves_data_dependency():
        return
    if opt.offload_optimizer:
        stream.synchronize()
    else:
        accelerator.current_stream().wait_stream(stream)


def _on(keep: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`keep` itself where it already lives on `device` (shared with the optimizer), else one copy there."""
    return keep if keep.device == device else keep.to(device)


class GradMasker:
    """Zero the gradients of masked-out elements before DeepSpeed computes the norm and steps, so that gradient
    clipping sees the masked gradient. It reads the optimizer's masks (`build_masks`) and touches only this rank's
    gradient partition, so no rank holds a mask of more than the elements it owns:
    - ZeRO-3: each sub-group's slice of the flat gradient-partition buffer (one masking kernel per sub-group, the
      optimizer's own mask, no host sync: the stream wait is on the device), or under CPU offload the fp32
      partition's `.grad` together with the per-parameter norms clipping reads (one wait for the reduce stream per
      step, as DeepSpeed's own offloaded step takes). Only NVMe-swapped sub-groups go through DeepSpeed's
      local-grad API, which waits for the device once per parameter;
    - ZeRO-1/2: the reduced gradient partition (`averaged_gradients`, or the offloaded fp32 `.grad` together with
      the per-parameter norms DeepSpeed's offload path computed before it) at the accumulation boundary;
    - ZeRO-0 with bf16: a tensor hook on each parameter (each rank holds every element there anyway). Under fp32
      ZeRO-0 no masker is needed: MaskedAdamW clips there and masks the gradients before it takes their norm.
    """

    def __init__(self, engine: Any, pieces: list[Piece], target_masks: dict[int, torch.Tensor],
                 device: torch.device):
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        self.handles = []
        self.params: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.groups: list[tuple[int, torch.Tensor, list[Piece]]] = []
        self.zero3: list[_Zero3Group] = []
        if self.stage == 3:
            opt = engine.optimizer
            swapped = {g for g in range(len(opt.fp16_groups)) if _swapped(opt, g)}
            self.zero3 = [z for z in _zero3_groups(opt, target_masks) if z.index not in swapped]
            self.params = [(p.param, _on(target_masks[id(p.target)][p.target_offset:p.target_offset + p.numel],
                                         device)) for p in pieces
                           if opt.grad_position[opt.get_param_id(p.param)][0] in swapped]
        elif self.stage in (1, 2):
            for i, target in enumerate(engine.optimizer.single_partition_of_fp32_groups):
                if id(target) in target_masks:
                    mine = [p for p in pieces if p.target is target]
                    self.groups.append((i, target_masks[id(target)], mine))
        else:
            for p in pieces:
                keep = _on(target_masks[id(p.target)][p.target_offset:p.target_offset + p.numel],
                           p.param.device).view(p.param.shape)
                self.handles.append(p.param.register_hook(lambda g, keep=keep: keep_only(g, keep, inplace=False)))

    def mask_elements(self) -> int:
        """Mask elements this masker holds beyond the optimizer's own (0 where they share a device)."""
        held = [keep for _, keep in self.params]
        return sum(k.numel() for k in held if k._base is None)

    @torch.no_grad()
    def before_step(self) -> None:
        """Call after engine.backward and before engine.step on every micro-step (it acts at the boundary)."""
        if self.stage == 0 or not self.engine.is_gradient_accumulation_boundary():
            return
        if self.stage == 3:
            opt = self.engine.optimizer
            _wait_for_reduction(opt)
            for z in self.zero3:
                if opt.offload_optimizer:
                    grad = opt.fp32_partitioned_groups_flat[z.index].grad
                    if grad is None:
                        continue
                    keep_only(grad, z.keep)
                    # clipping reads these norms under offload (the reduced parameters'); computed on the host,
                    # where DeepSpeed sums them with its own: no copy to the device
                    norms = opt.norm_for_param_grads
                    for param_id, offset, numel in z.params:
                        if param_id in norms:
                            norms[param_id] = grad.narrow(0, offset, numel).norm(2).to(norms[param_id].dtype)
                else:
                    keep_only(opt.grad_partitions_flat_buffer.narrow(0, z.start, z.keep.numel()), z.keep)
            if not self.params:
                return
            from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

            for p, keep in self.params:
                g = safe_get_local_grad(p)
                if g is not None:  # in place: g is this rank's grad partition itself or a copy that is set back
                    safe_set_local_grad(p, keep_only(g, keep.view_as(g)))
            return
        opt = self.engine.optimizer
        for i, keep, pieces in self.groups:
            if opt.cpu_offload:  # the fp32 partition's .grad, and the per-parameter norms clipping reads
                grad = opt.single_partition_of_fp32_groups[i].grad
                if grad is None:
                    continue
                keep_only(grad.view(-1), _on(keep, grad.device)[:grad.numel()])
                for p in pieces:
                    part = grad.view(-1)[p.target_offset:p.target_offset + p.numel]
                    opt.norm_for_param_grads[opt.get_param_id(p.param)] = part.norm(2)
                continue
            grads = opt.averaged_gradients.get(i)
            if grads is None:
                continue
            flat = getattr(grads, "flat_partition", None)
            if flat is not None:
                keep_only(flat.view(-1), _on(keep, flat.device)[:flat.numel()])
                continue
            at = 0
            for g in grads:  # the partition's pieces in order (the first from `first_offset`), then padding
                n = g.numel()
                if not getattr(g, "_zero_padding", False):
                    keep_only(g, _on(keep[at:at + n], g.device).view_as(g))
                at += n
