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
  clipping sees the masked gradient (ZeRO-3: the local fp32 gradient partitions through DeepSpeed's local-grad
  API, at the accumulation boundary; ZeRO-0/1/2: a tensor hook on each parameter, which runs before
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


def _on(keep: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`keep` itself where it already lives on `device` (shared with the optimizer), else one copy there."""
    return keep if keep.device == device else keep.to(device)


class GradMasker:
    """Zero the gradients of masked-out elements before DeepSpeed computes the norm and steps, so that gradient
    clipping sees the masked gradient. It reads the optimizer's masks (`build_masks`) and touches only this rank's
    gradient partition, so no rank holds a mask of more than the elements it owns:
    - ZeRO-3: the local fp32 gradient partitions through DeepSpeed's local-grad API, which hands them back on
      the accelerator (`device`) whether or not the optimizer is offloaded;
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
        if self.stage == 3:
            self.params = [(p.param, _on(target_masks[id(p.target)][p.target_offset:p.target_offset + p.numel],
                                         device)) for p in pieces]
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
