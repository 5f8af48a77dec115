"""Mask files: safetensors of bool tensors keyed by parameter name, with string metadata.

Readers can take a flat element range of one tensor (``read_range``) without loading the rest of the file,
which is how each ZeRO rank reads only the slice of every mask that its partition covers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class MaskError(ValueError):
    """A mask that does not fit the model, phrased with the offending names and shapes."""


def save_masks(path: str | Path, masks: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> None:
    """Write bool masks atomically (temp file + rename); metadata values are JSON-encoded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.to(torch.bool).contiguous() for k, v in masks.items()}
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    tmp.replace(path)


def read_metadata(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def mask_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def flat_range(handle, name: str, start: int, numel: int) -> torch.Tensor:
    """Elements [start, min(start+numel, size)) of the flattened tensor `name` in a safetensors file, reading only
    the rows that hold them."""
    sl = handle.get_slice(name)
    shape = sl.get_shape()
    end = min(start + numel, math.prod(shape))
    if end <= start:
        return torch.zeros(0, dtype=torch.bool)
    if not shape:  # a 0-d tensor cannot be sliced by rows
        return sl[:].reshape(-1)[start:end]
    row = math.prod(shape[1:])
    r0, r1 = start // row, -(-end // row)
    return sl[r0:r1].reshape(-1)[start - r0 * row: end - r0 * row]


def read_range(handle, name: str, start: int, numel: int) -> torch.Tensor:
    """Mask elements [start, start+numel) of tensor `name`; positions past its end (ZeRO-3 partition padding) come
    back False."""
    out = torch.zeros(numel, dtype=torch.bool)
    values = flat_range(handle, name, start, numel)
    out[:len(values)] = values.to(torch.bool)
    return out


def check_against_model(path: str | Path, params: Mapping[str, tuple[int, ...]],
                        aliases: Mapping[str, str] = {}) -> None:
    """Raise MaskError listing every name or shape that differs between a mask file and the model.

    `aliases` maps tied-weight names (e.g. lm_head.weight) to the parameter that owns them; a mask may carry
    an alias only if it equals its owner's mask shape.
    """
    shapes = mask_shapes(path)
    missing = sorted(set(params) - set(shapes))
    extra = sorted(n for n in set(shapes) - set(params) if n not in aliases)
    wrong = sorted(f"{n}: mask {shapes[n]} vs model {params[n]}" for n in set(shapes) & set(params)
                   if tuple(shapes[n]) != tuple(params[n]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} model parameters have no mask: {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    if extra:
        problems.append(f"{len(extra)} masks name no model parameter: {', '.join(extra[:10])}"
                        + (" ..." if len(extra) > 10 else ""))
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong[:10]) + (" ..." if len(wrong) > 10 else ""))
    if problems:
        raise MaskError(f"{path} does not fit the model: " + " | ".join(problems))


def mask_counts(path: str | Path) -> dict[str, int]:
    """Selected elements per tensor: from the JSON sidecar `locate` writes, the file's metadata, or by counting."""
    sidecar = Path(path).with_suffix(".json")
    if sidecar.exists():
        return json.loads(sidecar.read_text())["counts"]
    counts = read_metadata(path).get("counts")
    if counts is not None:
        return counts
    with safe_open(str(path), framework="pt") as f:
        return {k: int(f.get_tensor(k).sum()) for k in f.keys()}
