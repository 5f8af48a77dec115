"""Locating key neurons from a ZeRO run's partitions (spec §1), so a 70B user never merges a checkpoint on one node.

Each rank scores the elements it owns (its fp32 master partition of θ' and the same ranges of θ read from the
starting checkpoint), and the selection is the one `locate` makes offline, element for element: the top-bits
histograms are summed over ranks (all-reduce); a big threshold bin gets its low-bits histogram summed the same
way, and the elements tied at the exact threshold key are shared out in global (tensor, flat index) order from
every rank's tie counts; a small threshold bin's keys are gathered and resolved identically on every rank. Rank 0
then writes each mask tensor from the ranks' pieces, one tensor at a time.

Collectives come from `comm` (the engine's Strategy: `all_reduce`, `all_gather_object`, `gather_object`, `rank`),
so this module itself imports neither DeepSpeed nor torch.distributed. An error on one rank (NaN, bad shapes) is
agreed on by all ranks before anyone raises, so no rank is left waiting in a collective.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from allo.masks.io import MaskWriter
from allo.masks.locate import (CHUNK, COLLECT_CAP, KEY_BITS, LocateError, Reader, Scratch, _resolve, check_finite,
                               check_ratios, compute_cuts, count_into, group_of, pin_exact_key, select_band)


def _agree(comm: Any, error: str | None) -> None:
    """Raise on every rank if any rank has an error (its message); otherwise return on every rank."""
    errors = [e for e in comm.all_gather_object(error) if e]
    if errors:
        raise LocateError(errors[0])


def locate_partitioned(local: Sequence[tuple[str, int, torch.Tensor]], shapes: dict[str, tuple[int, ...]],
                       base_dir: str | Path, lr: float, ratios: dict[str, float], out_dir: str | Path, comm: Any,
                       scope: str = "global", band_start: float = 0.0, bottom: bool = False, bin_bits: int = 20,
                       collect_cap: int | None = None, source: str = "") -> dict[str, Path]:
    """Masks from this rank's slices `local` = [(name, flat start, θ' values)]; every rank calls it together.
    `shapes`: every parameter's full shape. Returns the mask paths (written by rank 0)."""
    check_ratios(ratios, band_start, lr)
    base = Reader(base_dir)
    names = sorted(shapes)
    order = {n: i for i, n in enumerate(names)}
    problems = [f"{n}: not in {base_dir}" for n in names if n not in base.files]
    problems += [f"{n}: base {list(base.meta(n)[0])} vs run {list(shapes[n])}" for n in names
                 if n in base.files and tuple(base.meta(n)[0]) != tuple(shapes[n])]
    if problems:  # every rank reads the same files and shapes, so every rank raises here
        raise LocateError("the starting checkpoint does not fit the run: " + "; ".join(problems[:10]))
    local = sorted(local, key=lambda x: (order[x[0]], x[1]))
    shift = KEY_BITS - bin_bits
    cap = COLLECT_CAP if collect_cap is None else collect_cap
    scratch = Scratch(bottom)

    def pieces() -> Iterator[tuple[int, str, int, torch.Tensor]]:
        """(slice index, name, global flat offset, key) over this rank's elements, in chunks; a key is valid until
        the next one is produced."""
        for i, (name, start, tuned) in enumerate(local):
            for c0 in range(0, tuned.numel(), CHUNK):
                t = tuned[c0:c0 + CHUNK].detach().cpu()
                yield i, name, start + c0, scratch.keys(base.range(name, start + c0, t.numel()), t)

    groups = sorted({group_of(n, scope) for n in names})
    gidx = {g: j for j, g in enumerate(groups)}
    # ---- pass 1: local histograms, summed over ranks
    hist = torch.zeros(len(groups), 2 ** bin_bits, dtype=torch.int64)
    count = torch.zeros(len(groups), dtype=torch.int64)
    changed = torch.zeros(1, dtype=torch.int64)
    error = None
    try:
        for _, name, _, key in pieces():
            chunk_hist = torch.bincount(scratch.bins_of(key, shift), minlength=2 ** bin_bits)
            check_finite(chunk_hist, shift, bottom, name)
            j = gidx[group_of(name, scope)]
            hist[j] += chunk_hist
            count[j] += key.numel()
            if not changed.item():
                changed += int(bool(key.any()))
    except LocateError as e:
        error = str(e)
    _agree(comm, error)
    for t in (hist, count, changed):
        comm.all_reduce(t, "sum")
    if int(count.sum()) != sum(math.prod(s) for s in shapes.values()):
        raise LocateError(f"the ranks' slices cover {int(count.sum())} elements, the model has "
                          f"{sum(math.prod(s) for s in shapes.values())}: the partition layout is not what was expected")
    if not bottom and not changed.item():
        raise LocateError("θ' equals the starting checkpoint everywhere (every score is 0): nothing to rank")
    cuts = compute_cuts({g: (int(count[j]), hist[j]) for g, j in gidx.items()}, ratios, band_start)
    del hist
    slots = [(label, g, which, c) for label, per in cuts.items() for g, pair in per.items()
             for which, c in zip(("hi", "lo"), pair) if c is not None]
    big = [(label, g, which, c) for label, g, which, c in slots if not c.takes_whole_bin and c.count > cap]
    taken: dict[tuple, int] = {}
    if big:
        # ---- pass 1b: low-bits histograms of the big bins, summed; then each rank's share of the exact ties
        low = torch.zeros(len(big), 2 ** shift, dtype=torch.int64)
        for _, name, _, key in pieces():
            for m, (_, g, _, c) in enumerate(big):
                if g == group_of(name, scope):
                    count_into(low[m], key[scratch.bins_of(key, shift) == c.bin] & ((1 << shift) - 1))
        comm.all_reduce(low, "sum")
        for m, (_, _, _, c) in enumerate(big):
            pin_exact_key(c, low[m].numpy(), shift)
        ties = torch.zeros(len(big), len(local), dtype=torch.int64)
        for i, name, _, key in pieces():
            for m, (_, g, _, c) in enumerate(big):
                if g == group_of(name, scope):
                    ties[m, i] += int(torch.count_nonzero(key == c.exact_key))
        everyone = comm.all_gather_object([(order[n], s, ties[:, i].tolist()) for i, (n, s, _) in enumerate(local)])
        ranked = sorted((o, s, r, counts) for r, part in enumerate(everyone) for o, s, counts in part)
        for m, (label, g, which, c) in enumerate(big):
            before = 0
            for o, s, r, counts in ranked:
                share = max(0, min(counts[m], c.need_at_key - before))
                before += counts[m]
                if r == comm.rank:  # pre-charge the slot so `_select` takes exactly this slice's share
                    i = next(i for i, (n, st, _) in enumerate(local) if order[n] == o and st == s)
                    taken[(label, g, i, which)] = c.need_at_key - share
    # ---- pass 2: local selections (N / world bytes per label)
    sels = {label: [torch.zeros(t.numel(), dtype=torch.bool) for _, _, t in local] for label in ratios}
    for i, name, offset, key in pieces():
        g, rel = group_of(name, scope), offset - local[i][1]
        for label in ratios:
            sel = select_band(key, cuts[label][g], shift, taken, (label, g, i), order[name], offset, scratch)
            sels[label][i][rel:rel + key.numel()] = sel
    # small threshold bins: gather their keys from every rank, resolve identically, apply to the local slices
    for label, g, which, c in slots:
        gathered = [x for part in comm.all_gather_object(c.candidates) for x in part]
        if not gathered:
            continue
        c.candidates = gathered
        for o, idx in _resolve(c):
            for i, (n, start, t) in enumerate(local):
                if order[n] == o:
                    inside = idx[(idx >= start) & (idx < start + t.numel())] - start
                    sels[label][i][inside] = which == "hi"
    # ---- write: rank 0 assembles each tensor from the ranks' pieces
    out_dir = Path(out_dir)
    paths = {}
    for label, r in ratios.items():
        writer = MaskWriter(out_dir / f"{label}.safetensors", [(n, shapes[n]) for n in names]) \
            if comm.rank == 0 else None
        counts: dict[str, int] = {}
        for n in names:
            mine = [(st, sels[label][i]) for i, (nm, st, _) in enumerate(local) if nm == n]
            parts = comm.gather_object(mine)
            if writer is not None:
                full = torch.zeros(math.prod(shapes[n]), dtype=torch.bool)
                for part in parts:
                    for st, sel in part:
                        full[st:st + sel.numel()] = sel
                writer.write(n, full)
                counts[n] = int(torch.count_nonzero(full))
        if writer is not None:
            writer.close()
            total = sum(math.prod(s) for s in shapes.values())
            selected = sum(counts.values())
            from allo.io import write_json

            write_json(out_dir / f"{label}.json", {
                "ratio": r, "band_start": band_start, "scope": scope, "bottom": bottom, "lr": lr,
                "selected": selected, "total": total, "achieved_ratio": 100 * selected / total,
                "base": str(base_dir), "tuned": source or "ZeRO partitions of the run", "base_hash": None,
                "tuned_hash": None, "from_partitions": True, "counts": counts})
        paths[label] = out_dir / f"{label}.safetensors"
    return paths
