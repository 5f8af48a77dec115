"""Mask files: safetensors keyed by parameter name, bit-packed, with string metadata.

allo writes every mask tensor flattened and packed eight elements to a byte (element i is bit i % 8 of byte
i // 8), as a U8 tensor; the file's metadata names the format and holds the real shapes. A 70B mask is then
8.75 GB instead of 70 GB, and locate writes an eighth of the bytes. Plain BOOL safetensors (older allo files,
other tools) are read as well. Readers can take a flat element range of one tensor (`MaskFile.range`) without
loading the rest of the file, which is how each ZeRO rank reads only the slice of every mask that its partition
covers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open

from allo.io import SafetensorsWriter

FORMAT_KEY, FORMAT = "allo_mask_format", "bits-le/1"
INTERNAL = (FORMAT_KEY, "shapes")  # metadata keys of the format itself, not the caller's


class MaskError(ValueError):
    """A mask that does not fit the model, phrased with the offending names and shapes."""


def pack_bits(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """Flat bool mask -> uint8, element i in bit i % 8 of byte i // 8."""
    flat = mask.reshape(-1).cpu().numpy() if isinstance(mask, torch.Tensor) else mask.reshape(-1)
    return np.packbits(flat.view(np.uint8), bitorder="little")


def set_bits(packed: np.ndarray, idx: np.ndarray, value: bool) -> None:
    """packed[element idx] = value, in place (idx may repeat a byte)."""
    bits = np.left_shift(np.uint8(1), (idx & 7).astype(np.uint8))
    if value:
        np.bitwise_or.at(packed, idx >> 3, bits)
    else:
        np.bitwise_and.at(packed, idx >> 3, ~bits)


def first_set_bits(packed: np.ndarray, k: int) -> np.ndarray:
    """A copy of a packed mask keeping only its first k set elements (lowest index first)."""
    counts = np.cumsum(np.bitwise_count(packed), dtype=np.int64)
    if k <= 0 or not len(counts):
        return np.zeros_like(packed)
    if counts[-1] <= k:
        return packed.copy()
    j = int(np.searchsorted(counts, k))  # the byte where the running count reaches k
    out = packed.copy()
    out[j + 1:] = 0
    keep, byte = k - (int(counts[j - 1]) if j else 0), 0
    for bit in range(8):
        if keep and out[j] >> bit & 1:
            byte |= 1 << bit
            keep -= 1
    out[j] = byte
    return out


def unpack_bits(packed: np.ndarray, skip: int, count: int) -> torch.Tensor:
    """`count` flat bool elements from packed bytes, starting `skip` bits into the first byte."""
    bits = np.unpackbits(packed, count=skip + count, bitorder="little")[skip:]
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bool)


class MaskFile:
    """An open mask file: `shapes`, `metadata`, whole tensors (`get`) and flat ranges (`range`)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._h = safe_open(self.path, framework="pt")
        raw = self._h.metadata() or {}
        self.packed = raw.get(FORMAT_KEY) == FORMAT
        if self.packed:
            self.shapes = {k: tuple(v) for k, v in json.loads(raw["shapes"]).items()}
        else:
            self.shapes = {k: tuple(self._h.get_slice(k).get_shape()) for k in self._h.keys()}
        self.metadata = {k: json.loads(v) for k, v in raw.items() if k not in INTERNAL}

    def __enter__(self) -> "MaskFile":
        return self

    def __exit__(self, *exc) -> None:
        del self._h  # closes the file's mapping

    def get(self, name: str) -> torch.Tensor:
        """The whole mask of tensor `name`, bool, in its shape."""
        shape = self.shapes[name]
        if not self.packed:
            return self._h.get_tensor(name).to(torch.bool)
        return unpack_bits(self._h.get_tensor(name).numpy(), 0, math.prod(shape)).reshape(shape)

    def range(self, name: str, start: int, numel: int) -> torch.Tensor:
        """Flat mask elements [start, start+numel) of tensor `name`; positions past its end (ZeRO-3 partition
        padding) come back False."""
        out = torch.zeros(numel, dtype=torch.bool)
        end = min(start + numel, math.prod(self.shapes[name]))
        if end <= start:
            return out
        if self.packed:
            values = unpack_bits(self._h.get_slice(name)[start // 8: -(-end // 8)].numpy(), start % 8, end - start)
        else:
            values = flat_range(self._h, name, start, end - start).to(torch.bool)
        out[:end - start] = values
        return out


def read_metadata(path: str | Path) -> dict:
    return MaskFile(path).metadata


def mask_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    return MaskFile(path).shapes


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    with MaskFile(path) as f:
        return {k: f.get(k) for k in f.shapes}


def save_masks(path: str | Path, masks: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> None:
    """Write masks (anything nonzero is selected) atomically; metadata values are JSON-encoded."""
    w = MaskWriter(path, [(k, tuple(v.shape)) for k, v in masks.items()], metadata)
    for k, v in masks.items():
        w.write(k, v.to(torch.bool))
    w.close()


class MaskWriter(SafetensorsWriter):
    """Writes a packed mask file one tensor (or chunk) at a time, in order (see `SafetensorsWriter`), and patches
    elements already written."""

    def __init__(self, path: str | Path, tensors: Sequence[tuple[str, tuple[int, ...]]],
                 metadata: Mapping[str, object] = {}):
        meta = {k: json.dumps(v) for k, v in metadata.items()}
        meta.update({FORMAT_KEY: FORMAT, "shapes": json.dumps({n: list(s) for n, s in tensors})})
        self.sizes = {name: math.prod(shape) for name, shape in tensors}
        super().__init__(path, [(n, "U8", [-(-self.sizes[n] // 8)], -(-self.sizes[n] // 8)) for n, _ in tensors], meta)

    def write(self, name: str, mask: torch.Tensor, offset: int = 0) -> None:
        """Write the flat elements [offset, offset + mask.numel()) of tensor `name`, in file order. `offset` is a
        multiple of 8 (only a tensor's last piece may end mid-byte)."""
        self.write_packed(name, pack_bits(mask), offset)

    def write_packed(self, name: str, packed: np.ndarray, offset: int = 0) -> None:
        """`write`, of a mask already packed by `pack_bits`."""
        assert offset % 8 == 0, f"{name}: a piece must start on a whole byte"
        super().write(name, packed.data, offset // 8)

    def patch(self, name: str, flat_idx: torch.Tensor, value: bool) -> None:
        """Set elements of a tensor already written (a resolved threshold bin) to `value`, in one vectorised write."""
        self.f.flush()
        m = np.memmap(self.tmp, dtype=np.uint8, mode="r+", offset=self.data_start + self.offsets[name],
                      shape=(-(-self.sizes[name] // 8),))
        set_bits(m, flat_idx.numpy(), value)
        del m  # a shared mapping: the page cache has the bytes now; close() makes them durable with one fsync


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


def match_names(mask: Mapping[str, tuple[int, ...]], params: Mapping[str, tuple[int, ...]],
                aliases: Mapping[str, str] = {}) -> tuple[dict[str, str], list[str]]:
    """(parameter name -> its name in the mask, the mask's names that name no parameter). A parameter is found
    under its own name; under another name of the same tensor (`aliases`: tied weights, e.g. lm_head.weight ->
    model.embed_tokens.weight); or under the name its checkpoint file gives it where transformers renames tensors
    on load and save (GPT-NeoX's embed_out.weight is the module's lm_head.weight): the one name left on each side
    with the same shape and the same last part (weight, bias). A mask written from checkpoint files and one
    written from the module's parameters then both fit."""
    found = {p: p for p in params if p in mask}
    for alias, owner in aliases.items():
        if owner in params and owner not in found and alias in mask:
            found[owner] = alias
    used = set(found.values()) | {a for a, o in aliases.items() if a in mask and o in found}  # an alias beside
    left_mask = [m for m in mask if m not in used]                                            # its owner

    def kind(name: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple:
        return tuple(shapes[name]), name.rsplit(".", 1)[-1]

    left_params = [p for p in params if p not in found]
    for p in left_params:
        same = [m for m in left_mask if kind(m, mask) == kind(p, params)]
        if len(same) == 1 and sum(kind(q, params) == kind(p, params) for q in left_params) == 1:
            found[p] = same[0]
            left_mask.remove(same[0])
    return found, left_mask


def check_against_model(path: str | Path, params: Mapping[str, tuple[int, ...]],
                        aliases: Mapping[str, str] = {}) -> dict[str, str]:
    """Parameter name -> its name in the mask file (`match_names`), or MaskError listing every name or shape that
    differs between the file and the model."""
    shapes = mask_shapes(path)
    found, extra = match_names(shapes, params, aliases)
    missing = sorted(set(params) - set(found))
    wrong = sorted(f"{n}: mask {shapes[m]} vs model {params[n]}" for n, m in found.items()
                   if tuple(shapes[m]) != tuple(params[n]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} model parameters have no mask: {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    if extra:
        problems.append(f"{len(extra)} masks name no model parameter: {', '.join(sorted(extra)[:10])}"
                        + (" ..." if len(extra) > 10 else ""))
    if wrong:
        problems.append("shape mismatch: " + "; ".join(wrong[:10]) + (" ..." if len(wrong) > 10 else ""))
    if problems:
        raise MaskError(f"{path} does not fit the model: " + " | ".join(problems))
    return found


def mask_counts(path: str | Path) -> dict[str, int]:
    """Selected elements per tensor: from the JSON sidecar `locate` writes, the file's metadata, or by counting."""
    sidecar = Path(path).with_suffix(".json")
    if sidecar.exists():
        return json.loads(sidecar.read_text())["counts"]
    with MaskFile(path) as f:
        counts = f.metadata.get("counts")
        return counts if counts is not None else {k: int(f.get(k).sum()) for k in f.shapes}
