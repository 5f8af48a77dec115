"""The one exact top-k selection of `allo locate` (docs/method.md §1), for any source of scored chunks and any
communicator.

Scores are non-negative float32 |θ' − θ|, whose bit patterns sort like their values, so an element's rank is
decided by an integer key (the bits; for `bottom` their complement). Pass 1 builds, per selection group (the
whole model, a layer or a tensor), a histogram of the keys' top bits: for every k wanted, it gives the bin holding
the k-th key and how many elements of that bin are needed. Pass 2 selects every element above that bin and
resolves the bin itself exactly. A bin of at most `collect_cap` elements (the usual case: 2^20 bins spread a
continuous distribution thin) has its keys collected during pass 2 and the exact cut patched in at the end; a
larger one (massive ties: unchanged weights under `bottom`, bf16 rounding) first gets a histogram of its keys' low
bits (pass 1b), which pins the exact threshold key, so pass 2 selects everything above it and the first
`need_at_key` elements equal to it. Ties go to the earlier tensor (sorted names) and the lower flat index, so
exactly ⌊N·r/100⌋ elements are selected, whatever the thread count, the chunking or the number of ranks.

The data come from a source (`chunks(stage, names)` yields (tensor order, name, global flat offset, θ, θ') in
order; `names`/`shapes` list every tensor of the model) and the selections go to a sink (`write`, `patch`,
`finish`). Offline (`locate.py`) one process reads two checkpoints; from ZeRO partitions (`locate_partitioned.py`)
each rank holds its slices, and the communicator sums histograms and shares the ties (`SingleProcess` offline).
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch

from allo.masks.io import first_set_bits, pack_bits

log = logging.getLogger(__name__)
LAYER = re.compile(r"\.layers\.(\d+)\.")
KEY_BITS = 31  # non-negative float32 bit patterns fit in 31 bits
NONFINITE = 0x7F800000  # bit patterns at or above this are Inf or NaN (the sign bit is cleared by abs)
COLLECT_CAP = 1 << 22  # default: threshold bins up to this size are resolved from collected keys (24 bytes each)
TIE_WARNING = 0.05  # warn when more elements tie at a threshold than this share of the k selected


class LocateError(ValueError):
    """Checkpoints or settings that cannot give a meaningful mask."""


Chunk = tuple[int, str, int, torch.Tensor, torch.Tensor]  # tensor order, name, global flat offset, θ, θ'


class Source(Protocol):
    names: list[str]                     # every tensor of the model, sorted
    shapes: dict[str, tuple[int, ...]]
    # optional `fp32: bool`: the tuned weights are fp32 masters (the tie warning then advises a longer warm-up)

    def chunks(self, stage: str, names: Sequence[str]) -> Iterator[Chunk]: ...


class Sink(Protocol):
    def write(self, label: str, name: str, offset: int, packed: np.ndarray) -> None: ...

    def patch(self, label: str, name: str, flat_idx: torch.Tensor, value: bool) -> None: ...

    def finish(self, label: str) -> Optional[dict[str, int]]: ...  # selected count per tensor (rank 0)


class SingleProcess:
    """The communicator of the offline path: one rank, every collective the identity."""
    rank, world = 0, 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_gather_object(self, obj: Any) -> list:
        return [obj]

    def gather_object(self, obj: Any) -> list:
        return [obj]


# ------------------------------------------------------------------------------------------------ keys
class Scratch:
    """Chunk-sized buffers reused for every chunk (a fresh temporary costs more in page faults than the arithmetic
    done in it), so keys, bins and comparisons are computed in place. One per scoring thread; what `keys`,
    `bins_of` and `buf` return is valid until their next call."""

    def __init__(self, bottom: bool):
        self.bottom = bottom
        self.bufs: dict[str, torch.Tensor] = {}

    def _get(self, role: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        t = self.bufs.get(role)
        if t is None or t.numel() < n:
            t = self.bufs[role] = torch.empty(n, dtype=dtype)
        return t[:n]

    def keys(self, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        """Integer rank keys of |θ' − θ| (the 1/α factor does not change the order): the float32 bits, which sort
        like the values; for `bottom` their complement. A NaN or Inf in either weight gives a key >= NONFINITE."""
        d = self._get("diff", base.numel(), torch.float32)
        if base.dtype == tuned.dtype == torch.float32:
            torch.sub(tuned.reshape(-1), base.reshape(-1), out=d)
        else:  # bf16/fp16 weights: subtract in float32, where the difference of two of them is exact
            d.copy_(tuned.reshape(-1)).sub_(base.reshape(-1))
        key = d.abs_().view(torch.int32)
        return key.bitwise_xor_(2 ** KEY_BITS - 1) if self.bottom else key  # = 2^31 − 1 − key, in place

    def bins_of(self, key: torch.Tensor, shift: int) -> torch.Tensor:
        return torch.bitwise_right_shift(key, shift, out=self._get("bins", key.numel(), torch.int32))

    def buf(self, role: str, n: int) -> torch.Tensor:
        return self._get(role, n, torch.bool)


def scoring_threads(requested: int = 0) -> int:
    """Threads that score chunks side by side: `requested`, else ALLO_LOCATE_THREADS, else every core this process
    may use, at most 8 (each holds ~40 MB of chunk buffers)."""
    raw = os.environ.get("ALLO_LOCATE_THREADS", "")
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise LocateError(f"ALLO_LOCATE_THREADS={raw!r}: expected a whole number >= 1")
        return int(raw)
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not macOS
    return min(8, cores)


def in_order(jobs: Iterator, work, threads: int, bottom: bool) -> Iterator:
    """work(job, scratch) over `jobs` on `threads` threads, each with its own Scratch; results in job order, at most
    2 × threads jobs in flight. Most of a chunk's work (bincount, numpy comparisons, nonzero, packing) runs on one
    core whatever torch's thread count, so chunks go side by side instead, with torch ops on one thread each."""
    local = threading.local()

    def run(job):
        if not hasattr(local, "scratch"):
            local.scratch = Scratch(bottom)
        return work(job, local.scratch)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="locate-score") as pool:
            pending: deque = deque()
            for job in jobs:
                pending.append(pool.submit(run, job))
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(before)


def progress(total: int, desc: str, enabled: bool = True):
    """A progress bar counted in elements (a 70 B checkpoint takes a while per pass)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="elem", unit_scale=True, mininterval=2, disable=not enabled)


# ------------------------------------------------------------------------------------------------ cuts
@dataclass
class Cut:
    """Where the k-th key of a group lies: keys in bins above `bin` all count, `need` more come from the bin,
    which holds `count` elements. Resolved by collecting the bin's keys (`candidates`), or, for a big bin, by
    the exact threshold key found in the low-bits pass (`exact_key`, of which the first `need_at_key` count out of
    the `tied` elements equal to it)."""
    k: int
    bin: int
    need: int
    count: int
    exact_key: int = -1
    need_at_key: int = 0
    tied: int = 0
    candidates: list = field(default_factory=list)  # (key, tensor_order, flat_idx) chunks

    @property
    def takes_whole_bin(self) -> bool:
        return self.need == self.count

    def collected(self, cap: int) -> bool:
        """Resolved from the bin's collected keys (not the whole bin, not pinned by the low-bits pass)."""
        return not self.takes_whole_bin and self.count <= cap


def group_of(name: str, scope: str) -> str:
    if scope == "global":
        return "all"
    if scope == "per_tensor":
        return name
    m = LAYER.search(name)
    return f"layer{m.group(1)}" if m else "other"


def check_finite(chunk_hist: torch.Tensor, shift: int, bottom: bool, name: str) -> None:
    """Pass 1's per-chunk histogram already says whether a key is Inf/NaN: no separate isfinite scan."""
    first = NONFINITE >> shift
    bad = chunk_hist[:len(chunk_hist) - first] if bottom else chunk_hist[first:]
    if bool(bad.any()):
        raise LocateError(f"{name}: NaN or Inf in the checkpoint weights")


def count_into(hist: torch.Tensor, values: torch.Tensor) -> None:
    """hist[v] += 1 for each v, in place: a threshold bin holds few of a chunk's keys, and a bincount would
    allocate the whole low-bits histogram for every chunk."""
    hist.index_put_((values.long(),), torch.ones(len(values), dtype=hist.dtype), accumulate=True)


def find_cut(hist: np.ndarray, k: int) -> Cut:
    """The bin holding the k-th largest key, counting from the top, and how many of its elements are needed."""
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, k))  # first position where the running count reaches k
    b = len(hist) - 1 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return Cut(k=k, bin=b, need=k - above, count=int(hist[b]))


def pin_exact_key(cut: Cut, low_hist: np.ndarray, shift: int) -> None:
    """From the low-bits histogram of a big threshold bin: the exact k-th key and how many equal to it count."""
    from_top = np.cumsum(low_hist[::-1])
    idx = int(np.searchsorted(from_top, cut.need))
    j = len(low_hist) - 1 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    cut.exact_key = (cut.bin << shift) | j
    cut.need_at_key = cut.need - above
    cut.tied = int(low_hist[j])


def compute_cuts(groups: dict[str, tuple[int, torch.Tensor]], ratios: dict[str, float],
                 band_start: float) -> dict[str, dict[str, tuple[Cut, Cut | None]]]:
    """Per label and group: the cut for the top r% and, with a band, the cut for the top band_start% (or None)."""
    cuts: dict[str, dict[str, tuple[Cut, Cut | None]]] = {}
    for label, r in ratios.items():
        cuts[label] = {}
        for gname, (n, hist) in groups.items():
            k_hi, k_lo = math.floor(n * r / 100), math.floor(n * band_start / 100)
            if k_hi == 0:
                raise LocateError(f"ratio {label}={r}% of {n} elements in group {gname} selects nothing")
            h = hist.numpy()
            cuts[label][gname] = (find_cut(h, k_hi), find_cut(h, k_lo) if k_lo > 0 else None)
    return cuts


def check_ratios(ratios: dict[str, float], band_start: float, lr: float) -> None:
    for label, r in ratios.items():
        if not 0 < r <= 100:
            raise LocateError(f"ratio {label}={r} is outside (0, 100]")
        if not 0 <= band_start < r:
            raise LocateError(f"band_start {band_start} must be in [0, {label}={r})")
    if lr <= 0:
        raise LocateError(f"learning rate α must be > 0, got {lr}")


# ------------------------------------------------------------------------------------------- pass 2 pieces
Parts = list  # per cut of a band (top, then band start): (packed selection, packed ties or None)


def band_parts(key: np.ndarray, pair: tuple[Cut, Cut | None], shift: int, order: int, offset: int,
               scratch: Scratch) -> Parts:
    """A chunk's selection for one label, as far as it can be made without the chunks before it: per cut, the
    elements above it and, at a pinned exact key, the elements tied at it, both packed; only the in-order
    `resolve_band` can share the ties out. Runs on the scoring threads."""
    return [compare(key, cut, shift, order, offset, scratch) for cut in pair if cut is not None]


def resolve_band(parts: Parts, pair: tuple[Cut, Cut | None], before: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """The chunk's packed selection for one label and the ties it took per cut: of the elements tied at an exact
    key, the chunk takes what the `before` ties of the positions ahead of it (in global order) left over; then a
    band's start cut is taken out."""
    done, took = [], []
    for (sel, ties), cut, ahead in zip(parts, pair, before):
        got = 0
        if ties is not None:
            extra = first_set_bits(ties, cut.need_at_key - ahead)
            sel |= extra
            got = int(np.bitwise_count(extra).sum())
        done.append(sel)
        took.append(got)
    return (done[0] & ~done[1] if len(done) == 2 else done[0]), took


def compare(key: np.ndarray, cut: Cut, shift: int, order: int, offset: int,
            scratch: Scratch) -> tuple[np.ndarray, np.ndarray | None]:
    """(keys surely above the cut, keys tied at its exact key or None), packed. The elements of a collected
    threshold bin are appended to `cut.candidates` (list.append is atomic and `_resolve` sorts them, so any thread
    may). Comparisons run in numpy on a view of a scratch buffer (numpy's are cheaper than torch's), and the bin's
    few elements are found in the packed masks, an eighth of the bytes to scan."""
    lo, hi = cut.bin << shift, (cut.bin + 1) << shift
    buf = scratch.buf("cmp", len(key)).numpy()
    if cut.takes_whole_bin:
        return pack_bits(np.greater_equal(key, lo, out=buf)), None
    if cut.exact_key >= 0:  # big bin, threshold key known: all above it, the first `need_at_key` equal to it
        above = pack_bits(np.greater(key, cut.exact_key, out=buf))
        return above, pack_bits(np.equal(key, cut.exact_key, out=buf))
    above = pack_bits(np.greater_equal(key, hi, out=buf)) if hi < 2 ** 31 else np.zeros(-(-len(key) // 8), np.uint8)
    in_bin = np.bitwise_xor(pack_bits(np.greater_equal(key, lo, out=buf)), above)
    nz = np.flatnonzero(in_bin)  # bytes holding the bin's elements (a few per chunk): collect them
    if len(nz):
        rows, bits = np.nonzero(np.unpackbits(in_bin[nz], bitorder="little").reshape(-1, 8))
        idx = torch.from_numpy(nz[rows] * 8 + bits)
        cut.candidates.append((torch.from_numpy(key[idx.numpy()].astype(np.int64)), torch.full_like(idx, order),
                               idx + offset))
    return above, None


def _resolve(cut: Cut) -> Iterator[tuple[int, torch.Tensor]]:
    """The `need` best candidates of a collected bin: larger key first, then earlier tensor, then lower index.
    Also counts, into `cut.tied`, the candidates whose key equals the last one taken."""
    keys = torch.cat([c[0] for c in cut.candidates])
    orders = torch.cat([c[1] for c in cut.candidates])
    idx = torch.cat([c[2] for c in cut.candidates])
    # lexicographic sort by (-key, order, idx) via stable sorts from the least significant key
    perm = torch.argsort(idx, stable=True)
    perm = perm[torch.argsort(orders[perm], stable=True)]
    perm = perm[torch.argsort(-keys[perm], stable=True)]
    chosen = perm[:cut.need]
    cut.tied = int((keys == keys[chosen[-1]]).sum()) if len(chosen) else 0
    for order in orders[chosen].unique().tolist():
        pick = chosen[orders[chosen] == order]
        yield order, idx[pick]


def _agree(comm: Any, error: Optional[str]) -> None:
    """Raise on every rank if any rank has an error (its message); otherwise return on every rank."""
    errors = [e for e in comm.all_gather_object(error) if e] if comm.world > 1 else [error] if error else []
    if errors:
        raise LocateError(errors[0])


# ------------------------------------------------------------------------------------------------ the routine
@dataclass
class Selection:
    counts: dict[str, dict[str, int]]    # per label: selected elements per tensor (rank 0; empty elsewhere)
    total: int                           # elements in the model
    ties: dict[str, int]                 # per label: elements tied at the top-r% threshold (0: not measured)


def select_masks(source: Source, sink: Sink, ratios: dict[str, float], comm: Any = None, *, scope: str = "global",
                 band_start: float = 0.0, bottom: bool = False, bin_bits: int = 20, collect_cap: Optional[int] = None,
                 threads: int = 0) -> Selection:
    """Select exactly ⌊N·r/100⌋ elements per group for every label of `ratios` (see the module docstring); every
    rank calls this together. The masks go to `sink`; returns the counts and tie sizes."""
    comm = comm or SingleProcess()
    shift, cap = KEY_BITS - bin_bits, COLLECT_CAP if collect_cap is None else collect_cap
    threads = scoring_threads(threads)
    names = source.names
    sizes = {n: math.prod(source.shapes[n]) for n in names}
    total = sum(sizes.values())
    group_names = sorted({group_of(n, scope) for n in names})
    show = comm.rank == 0

    # ---- pass 1: per group, a histogram of the keys' top bits (summed over ranks)
    hists: dict[str, torch.Tensor] = {}
    counted = 0  # elements seen here
    changed = bottom  # whether any weight differs (the `bottom` ranking is meaningful either way)
    # one rank holds every tensor: a group's cuts are computed as soon as its last tensor is in, and its
    # histogram (8 MB) dropped; with the per_tensor scope a 70 B model would otherwise hold ~700 of them
    last = {group_of(n, scope): i for i, n in enumerate(names)} if comm.world == 1 else {}
    cuts: dict[str, dict[str, tuple[Cut, Cut | None]]] = {label: {} for label in ratios}
    group_sizes = {g: 0 for g in group_names}
    for n in names:
        group_sizes[group_of(n, scope)] += sizes[n]

    def close_group(g: str) -> None:
        for label, per in compute_cuts({g: (group_sizes[g], hists.pop(g))}, ratios, band_start).items():
            cuts[label].update(per)

    def histogram(job: Chunk, scratch: Scratch) -> tuple:
        order, name, offset, b, t = job
        n = b.numel()
        chunk_hist = torch.bincount(scratch.keys(b, t).bitwise_right_shift_(shift), minlength=2 ** bin_bits)
        # a key outside bin 0 is nonzero; only a chunk of tiny keys is scored again to look for one
        nonzero = int(chunk_hist[0]) < n or bool(torch.count_nonzero(scratch.keys(b, t)))
        return order, name, offset, n, chunk_hist, nonzero

    error = None
    try:
        with progress(total // comm.world, "locate pass 1 (histograms)", show) as bar, \
                closing(in_order(source.chunks("histograms", names), histogram, threads, bottom)) as results:
            for order, name, offset, n, chunk_hist, nonzero in results:  # closing: threads stop at once on an error
                check_finite(chunk_hist, shift, bottom, name)
                g = group_of(name, scope)
                if g not in hists:
                    hists[g] = torch.zeros(2 ** bin_bits, dtype=torch.int64)
                hists[g] += chunk_hist
                counted += n
                changed = changed or nonzero
                bar.update(n)
                if last.get(g) == order and offset + n == sizes[name]:
                    close_group(g)
    except LocateError as e:
        if comm.world == 1:
            raise
        error = str(e)
    _agree(comm, error)
    if comm.world > 1:
        flags = comm.all_reduce(torch.tensor([counted, int(changed)], dtype=torch.int64), "sum")
        counted, changed = int(flags[0]), bool(flags[1])
        for g in group_names:
            hists[g] = comm.all_reduce(hists.get(g, torch.zeros(2 ** bin_bits, dtype=torch.int64)), "sum")
    if counted != total:
        raise LocateError(f"the chunks cover {counted} elements, the model has {total}: the partition layout is not "
                          "what was expected")
    if not changed:
        raise LocateError("the two checkpoints are identical (every score is 0): nothing to rank; was the warm-up "
                          "run trained (lr, steps)?")
    for g in group_names:  # the groups not closed yet (all of them with several ranks)
        if g in hists:
            close_group(g)

    # ---- pass 1b (only for threshold bins too big to collect): low-bits histograms pin the exact keys
    big = sorted({(g, c.bin) for per in cuts.values() for g, pair in per.items() for c in pair
                  if c is not None and not c.takes_whole_bin and c.count > cap})
    if big:
        low_hists = {gb: torch.zeros(2 ** shift, dtype=torch.int64) for gb in big}
        low_mask = (1 << shift) - 1
        scratch = Scratch(bottom)
        wanted = [n for n in names if any(g == group_of(n, scope) for g, _ in big)]
        with progress(sum(sizes[n] for n in wanted) // comm.world, "locate pass 1b (threshold keys)", show) as bar:
            for _, name, _, b, t in source.chunks("threshold keys", wanted):
                key = scratch.keys(b, t)
                bins = scratch.bins_of(key, shift)
                for g, bn in big:
                    if g == group_of(name, scope):
                        count_into(low_hists[(g, bn)], key[bins == bn] & low_mask)
                bar.update(key.numel())
        for gb in big:
            comm.all_reduce(low_hists[gb], "sum")
        for per in cuts.values():
            for g, pair in per.items():
                for c in pair:
                    if c is not None and (g, c.bin) in low_hists:
                        pin_exact_key(c, low_hists[(g, c.bin)].numpy(), shift)
    # ties at an exact key go to the first positions in global order: one rank finds what the positions before each
    # chunk took as it goes; several ranks count their chunks' ties first and share the counts
    ahead = _ties_ahead(source, comm, cuts, scope, bottom) if big and comm.world > 1 else None

    # ---- pass 2: the selections, chunk by chunk, in order; collected threshold bins are patched at the end
    taken: dict[tuple, int] = {}

    def select(job: Chunk, scratch: Scratch) -> tuple:
        order, name, offset, b, t = job
        key = scratch.keys(b, t).numpy()
        parts = {label: band_parts(key, cuts[label][group_of(name, scope)], shift, order, offset, scratch)
                 for label in ratios}
        return order, name, offset, len(key), parts

    with progress(total // comm.world, "locate pass 2 (masks)", show) as bar, \
            closing(in_order(source.chunks("masks", names), select, threads, bottom)) as results:
        for order, name, offset, n, parts in results:
            g = group_of(name, scope)
            for label, label_parts in parts.items():
                slots = [(label, g, role) for role, c in zip(("hi", "lo"), cuts[label][g]) if c is not None]
                before = [ahead.get(s + (order, offset), 0) if ahead is not None else taken.get(s, 0) for s in slots]
                sel, took = resolve_band(label_parts, cuts[label][g], before)
                for s, got in zip(slots, took):
                    taken[s] = taken.get(s, 0) + got
                sink.write(label, name, offset, sel)
            bar.update(n)
    for label in ratios:  # collected threshold bins: every rank resolves the same candidates, patches its own
        for g in group_names:
            for cut, value in zip(cuts[label][g], (True, False)):
                if cut is None or not cut.collected(cap):
                    continue
                if comm.world > 1:
                    cut.candidates = [x for part in comm.all_gather_object(cut.candidates) for x in part]
                if cut.candidates:
                    for order, idx in _resolve(cut):
                        sink.patch(label, names[order], idx, value)
    ties = {label: sum(hi.tied for hi, _ in cuts[label].values()) for label in ratios}
    counts = {label: sink.finish(label) for label in ratios}
    if show:
        for label, r in ratios.items():
            k = sum(hi.k for hi, _ in cuts[label].values())
            if ties[label] > TIE_WARNING * k:
                why = ("These are the warm-up's fp32 master weights: it moved these elements by the same amount; "
                       "more warm-up steps or a larger warmup.train.lr separate them." if getattr(source, "fp32", False)
                       else "Two bf16 (or fp16) checkpoints diffed at a small learning rate do this: most weights move "
                       "by less than one bf16 step. Rank the fp32 drift instead: `locate.from_partitions: true` (the "
                       "warm-up run scores its fp32 master weights), or diff fp32 exports.")
                log.warning("locate %s (%g%%): %d elements tie at the threshold score (%.2f× the %d to select), so "
                            "which of them are selected is decided by tensor name and index, not by training. %s",
                            label, r, ties[label], ties[label] / k, k, why)
    return Selection({k: v for k, v in counts.items() if v is not None}, total, ties)


def _ties_ahead(source: Source, comm: Any, cuts: dict, scope: str, bottom: bool) -> dict[tuple, int]:
    """For every pinned cut (label, group, role) and every chunk of this rank (order, offset): how many elements
    tied at the cut's exact key lie before the chunk in global (tensor, flat index) order, over all ranks."""
    slots = [(label, g, role, c) for label, per in cuts.items() for g, pair in per.items()
             for role, c in zip(("hi", "lo"), pair) if c is not None and c.exact_key >= 0]
    mine: list[tuple] = []  # (order, offset, counts per slot)
    scratch = Scratch(bottom)
    for order, name, offset, b, t in source.chunks("ties", source.names):
        key = scratch.keys(b, t)
        g = group_of(name, scope)
        mine.append((order, offset, [int(torch.count_nonzero(key == c.exact_key)) if sg == g else 0
                                     for _, sg, _, c in slots]))
    everyone = sorted(x for part in comm.all_gather_object(mine) for x in part)
    ahead: dict[tuple, int] = {}
    local = {(o, off) for o, off, _ in mine}
    for m, (label, g, role, _) in enumerate(slots):
        seen = 0
        for order, offset, counts in everyone:
            if (order, offset) in local:
                ahead[(label, g, role, order, offset)] = seen
            seen += counts[m]
    return ahead


def write_sidecar(out_dir: Path, label: str, ratio: float, counts: dict[str, int], total: int, ties: int,
                  meta: dict) -> Path:
    """`LABEL.json` beside the mask: ratio, achieved ratio, counts per tensor, threshold ties and the caller's
    provenance (`meta`: scope, α, sources, hashes)."""
    from allo.io import write_json

    selected = sum(counts.values())
    path = Path(out_dir) / f"{label}.json"
    write_json(path, {"ratio": ratio, **meta, "selected": selected, "total": total,
                      "achieved_ratio": 100 * selected / total, "threshold_ties": ties, "counts": counts})
    return path
