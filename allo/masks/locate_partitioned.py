"""Locating key neurons from a ZeRO run's partitions (docs/method.md §1), so a 70B user never merges a checkpoint on
one node.

Each rank scores the elements it owns (its fp32 master partition of θ' and the same ranges of θ read from the
starting checkpoint) with the one selection routine, `allo.masks.select.select_masks`, which sums the histograms
over ranks and shares ties in global (tensor, flat index) order, so the masks equal the offline ones element for
element. Each rank keeps its slices' selections packed (N / 8 / world bytes per label); rank 0 then writes each
mask tensor from the ranks' pieces, one tensor at a time.

Collectives come from `comm` (the engine's Strategy: `all_reduce`, `all_gather_object`, `gather_object`, `rank`,
`world`), so this module itself imports neither DeepSpeed nor torch.distributed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from allo.masks.io import MaskWriter, set_bits, unpack_bits
from allo.masks.locate import CHUNK, Reader
from allo.masks.select import Chunk, LocateError, check_ratios, select_masks, write_sidecar


class PartitionSource:
    """This rank's slices [(name, flat start, θ' values)] in chunks, with the same ranges of θ from the checkpoint."""
    fp32 = True  # θ' is the optimizer's fp32 master copy

    def __init__(self, local: Sequence[tuple[str, int, torch.Tensor]], shapes: dict[str, tuple[int, ...]],
                 base: Reader):
        self.names = sorted(shapes)
        self.shapes = shapes
        self.base = base
        order = {n: i for i, n in enumerate(self.names)}
        self.local = sorted(local, key=lambda x: (order[x[0]], x[1]))
        self.order = order

    def chunks(self, stage: str, names: Sequence[str]) -> Iterator[Chunk]:
        wanted = set(names)
        for name, start, tuned in self.local:
            if name not in wanted:
                continue
            for c0 in range(0, tuned.numel(), CHUNK):
                t = tuned[c0:c0 + CHUNK].detach().cpu()
                yield self.order[name], name, start + c0, self.base.range(name, start + c0, t.numel()), t


class GatherSink:
    """Keeps this rank's selections packed per slice; `finish` gathers them to rank 0, tensor by tensor."""

    def __init__(self, source: PartitionSource, out_dir: Path, comm: Any):
        self.source, self.out_dir, self.comm = source, out_dir, comm
        self.bufs: dict[str, list[np.ndarray]] = {}
        self.starts = {(name, start): i for i, (name, start, _) in enumerate(source.local)}

    def _slices(self, label: str) -> list[np.ndarray]:
        if label not in self.bufs:
            self.bufs[label] = [np.zeros(-(-t.numel() // 8), np.uint8) for _, _, t in self.source.local]
        return self.bufs[label]

    def write(self, label: str, name: str, offset: int, packed: np.ndarray) -> None:
        for i, (n, start, t) in enumerate(self.source.local):  # the slice holding this chunk (chunks never span two)
            if n == name and start <= offset < start + t.numel():
                rel = (offset - start) // 8
                self._slices(label)[i][rel:rel + len(packed)] = packed
                return
        raise AssertionError(f"{name}[{offset}] is in none of this rank's slices")

    def patch(self, label: str, name: str, flat_idx: torch.Tensor, value: bool) -> None:
        for i, (n, start, t) in enumerate(self.source.local):
            if n == name:
                inside = flat_idx[(flat_idx >= start) & (flat_idx < start + t.numel())] - start
                set_bits(self._slices(label)[i], inside.numpy(), value)

    def finish(self, label: str) -> Optional[dict[str, int]]:
        """Collective: rank 0 writes the label's mask file; returns its counts there (None elsewhere)."""
        shapes, comm = self.source.shapes, self.comm
        writer = MaskWriter(self.out_dir / f"{label}.safetensors", [(n, shapes[n]) for n in self.source.names]) \
            if comm.rank == 0 else None
        counts: dict[str, int] = {}
        slices = self._slices(label)
        for n in self.source.names:
            mine = [(st, t.numel(), slices[i]) for i, (nm, st, t) in enumerate(self.source.local) if nm == n]
            parts = comm.gather_object(mine)
            if writer is not None:
                full = torch.zeros(math.prod(shapes[n]), dtype=torch.bool)
                for part in parts:
                    for st, numel, packed in part:
                        full[st:st + numel] = unpack_bits(packed, 0, numel)
                writer.write(n, full)
                counts[n] = int(torch.count_nonzero(full))
        if writer is None:
            return None
        writer.close()
        return counts


def locate_partitioned(local: Sequence[tuple[str, int, torch.Tensor]], shapes: dict[str, tuple[int, ...]],
                       base_dir: str | Path, lr: float, ratios: dict[str, float], out_dir: str | Path, comm: Any,
                       scope: str = "global", band_start: float = 0.0, bottom: bool = False, bin_bits: int = 20,
                       collect_cap: Optional[int] = None, threads: int = 0, source: str = "") -> dict[str, Path]:
    """Masks from this rank's slices `local` = [(name, flat start, θ' values)]; every rank calls it together.
    `shapes`: every parameter's full shape. Returns the mask paths (written by rank 0)."""
    check_ratios(ratios, band_start, lr)
    base = Reader(base_dir)
    names = sorted(shapes)
    problems = [f"{n}: not in {base_dir}" for n in names if n not in base.files]
    problems += [f"{n}: base {list(base.meta(n)[0])} vs run {list(shapes[n])}" for n in names
                 if n in base.files and tuple(base.meta(n)[0]) != tuple(shapes[n])]
    if problems:  # every rank reads the same files and shapes, so every rank raises here
        raise LocateError("the starting checkpoint does not fit the run: " + "; ".join(problems[:10]))
    src = PartitionSource(local, shapes, base)
    out_dir = Path(out_dir)
    sink = GatherSink(src, out_dir, comm)
    sel = select_masks(src, sink, ratios, comm, scope=scope, band_start=band_start, bottom=bottom,
                       bin_bits=bin_bits, collect_cap=collect_cap, threads=threads)
    if comm.rank == 0:
        meta = {"band_start": band_start, "scope": scope, "bottom": bottom, "selection": "bottom" if bottom else "top",
                "lr": lr, "base": str(base_dir),
                "tuned": source or "ZeRO partitions of the run", "base_hash": None, "tuned_hash": None,
                "from_partitions": True}
        for label, r in ratios.items():
            write_sidecar(out_dir, label, r, sel.counts[label], sel.total, sel.ties[label], meta)
    return {label: out_dir / f"{label}.safetensors" for label in ratios}
